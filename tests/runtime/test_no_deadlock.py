"""No deadlock where transfers race with demand (issue 4), with the values still right.

Each scenario runs in a thread joined with a timeout (:func:`finishes`): a runtime that deadlocks
fails the test instead of hanging the suite. On CPU the :class:`TransferEngine` copies synchronously,
so nothing is ever in flight; :class:`HeldTransfers` (the real engine on its background thread, each
copy queued behind a gate) keeps copies in flight as long as a scenario needs, the state a GPU copy
stream is in while the host runs ahead. Routing is scripted per step, so every output is checked
against a reference computed from the store: the resident model's arithmetic for bf16 presets (bit
for bit), and dequantize-then-matmul at the precision each expert ran at for mixed ones.
"""

from __future__ import annotations

import itertools
import random
import threading

import pytest
import torch

from dymoe.checkpoint.blob import unpack_expert
from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.errors import BudgetError
from dymoe.models.expert_math import expert_forward
from dymoe.runtime.hotness import HotnessConfig, HotnessExperts
from dymoe.runtime.presets import preset_provider
from dymoe.runtime.resident import ResidentExperts
from dymoe.runtime.transfer import TransferEngine

LAYERS, EXPERTS, TOP_K, HIDDEN, WIDTH = (0, 1, 2), 8, 2, 128, 64
DEMANDED = range(4)  # scripted routing picks from these; wrong guesses from the rest
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(3)
    return {l: ((torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, generator=g) * 0.05).bfloat16(),
                (torch.randn(EXPERTS, HIDDEN, WIDTH, generator=g) * 0.05).bfloat16()) for l in LAYERS}


@pytest.fixture(scope="module")
def store(weights):
    return MemoryStore.from_experts(weights, precisions=("bf16", "int4"), group_size=64, pin=False)


@pytest.fixture(scope="module")
def resident(weights):
    return ResidentExperts({l: (a.float(), b.float()) for l, (a, b) in weights.items()})


def finishes(work, timeout=TIMEOUT_S):
    """``work()``'s result, run in a thread; fails the test if it has not returned after ``timeout``."""
    result, error = [], []

    def target():
        try:
            result.append(work())
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            error.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"deadlock: the runtime did not return within {timeout} s")
    if error:
        raise error[0]
    return result[0]


class HeldTransfers(TransferEngine):
    """The CPU engine with copies on its background thread, each queued behind a gate: a copy is in
    flight (``is_done`` False, ``pending`` set) until :meth:`release`. With ``release_on_wait`` a
    :meth:`wait` opens the gate first (a device stream would run the queued copies by then); without
    it, a runtime that waits on a held copy blocks, which is what the never-block tests look for."""

    def __init__(self, metrics, release_on_wait: bool = True):
        super().__init__("cpu", metrics, threaded=True)
        self.release_on_wait = release_on_wait
        self.gate = threading.Event()

    def fetch(self, key, src, dst):
        self._worker.submit(self.gate.wait)  # the one worker runs jobs in order: the copy waits too
        return super().fetch(key, src, dst)

    def wait(self, ticket):
        if self.release_on_wait:
            self.release()
        super().wait(ticket)

    def release(self) -> None:
        """Let every copy queued so far land; later ones are held again."""
        self.gate.set()
        self.gate = threading.Event()


@pytest.fixture
def held():
    engines = []

    def attach(runtime, release_on_wait=True):
        runtime.transfers = HeldTransfers(runtime.metrics, release_on_wait)
        engines.append(runtime.transfers)
        return runtime.transfers

    yield attach
    for engine in engines:
        engine.gate.set()
        engine.close()


def steps(seed, n):
    """``n`` decode steps of scripted routing: per step, per layer, TOP_K distinct experts of DEMANDED."""
    rng = random.Random(seed)
    return [{l: rng.sample(DEMANDED, TOP_K) for l in LAYERS} for _ in range(n)]


def token(seed):
    return torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(seed))


def router_weights(experts, seed=0):
    w = torch.rand(len(experts), generator=torch.Generator().manual_seed(seed)) + 0.5
    return (w / w.sum()).view(1, -1)


def reference(store, layer, hidden, experts, weights, precisions):
    """Dequantize-then-matmul of each expert at its precision, summed with the router weights."""
    out = torch.zeros_like(hidden)
    for j, (e, p) in enumerate(zip(experts, precisions)):
        gate, up, down = unpack_expert(store.blob(layer, e, p), store.layout(p), torch.float32)
        out += weights[0, j] * expert_forward(hidden, torch.cat([gate, up]), down)
    return out


def served_as(store, layer, hidden, experts, weights, out):
    """The precisions (one per expert) whose reference equals ``out``; fails if none does."""
    for precisions in itertools.product(("bf16", "int4"), repeat=len(experts)):
        if torch.allclose(out, reference(store, layer, hidden, experts, weights, precisions), rtol=1e-4, atol=1e-5):
            return precisions
    pytest.fail(f"layer {layer} experts {experts}: output matches no mix of bf16 and int4 copies")


class WrongGuesses:
    """A cross-layer predictor (the shape of ``CrossLayerPredictor``) whose guesses are never demanded."""

    def __init__(self, depth):
        self.depth = depth

    def targets(self, layer):
        return [l for l in LAYERS if l > layer][: self.depth]

    def predict(self, layer, hidden):
        targets = self.targets(layer)
        if not targets:
            return None
        wrong = [e for e in range(EXPERTS) if e not in DEMANDED]
        return torch.tensor([wrong[i % len(wrong) : i % len(wrong) + TOP_K] for i in range(len(targets))])


# ---- OffloadedExperts: prefetch and demand -----------------------------------------------------


def exact_budget(store, preset):
    """Exactly one token's top-k slots per precision class of ``preset`` (its share of the budget set
    to match), and that share."""
    if preset == "dymoe":
        high, low = store.layout("bf16").nbytes, store.layout("int4").nbytes
        return TOP_K * (high + low), {"high_share": high / (high + low)}
    return TOP_K * store.layout("bf16").nbytes, {}


def check_pool(runtime, budget):
    assert runtime.pool.capacity_bytes <= budget
    for p in runtime.pool.classes:
        assert runtime.pool.num_free(p) + len(runtime.cache.resident(p)) == runtime.pool.num_slots(p)  # no slot leaked


def offloaded(store, preset, slots_per_class, depth, **knobs):
    """``preset``'s runtime with ``slots_per_class`` x one token's top-k slots per class and a
    predictor that is always wrong; returns it and its budget."""
    budget, share = exact_budget(store, preset)
    budget *= slots_per_class
    runtime = preset_provider(store, preset, budget, TOP_K, "cpu", torch.float32, prefetch_depth=depth, **share,
                              **knobs)
    assert set(runtime.pool.counts.values()) == {slots_per_class * TOP_K}
    runtime.predictor = WrongGuesses(depth)
    return runtime, budget


def run_offloaded_steps(store, resident, runtime, budget, seed):
    """A prefill of 6 tokens, then 8 decode steps through every layer, each checked against the reference."""
    mixed = runtime.low is not None
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(6, HIDDEN, generator=g)
    ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(6)])
    w = torch.softmax(torch.randn(6, TOP_K, generator=g), -1)
    for layer in LAYERS:
        out = runtime.run_experts(layer, hidden, ids, w)
        if mixed:  # each token's row is its experts at the precisions they ran at, one per expert
            ran = {}
            for n in range(6):
                experts = ids[n].tolist()
                precisions = served_as(store, layer, hidden[n : n + 1], experts, w[n : n + 1], out[n : n + 1])
                for e, p in zip(experts, precisions):
                    assert ran.setdefault(e, p) == p
        else:
            assert torch.equal(out, resident.run_experts(layer, hidden, ids, w))
    for i, routing in enumerate(steps(seed, 8)):
        for layer in LAYERS:
            x, experts = token(100 * i + layer), routing[layer]
            weights = router_weights(experts, i)
            out = runtime.run_experts(layer, x, torch.tensor([experts]), weights)
            if mixed:
                used = tuple(runtime.cache.peek((layer, e)).precision for e in experts)
                expected = reference(store, layer, x, experts, weights, used)
                assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5), (layer, experts, used)
            else:
                assert torch.equal(out, resident.run_experts(layer, x, torch.tensor([experts]), weights))
        check_pool(runtime, budget)
    return runtime.stats()["total"]


@pytest.mark.parametrize("slots_per_class", [1, 2])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("preset, substitute", [("lru-prefetch", True), ("on-demand-prefetch", True),
                                                ("dymoe", True), ("dymoe", False)])
def test_wrong_prefetches_in_flight_never_block_demand(store, resident, held, preset, substitute, depth,
                                                       slots_per_class):
    """Every prediction is wrong and stays in flight until the runtime waits on a copy: demand evicts
    the unused prefetches (their copies still queued) and fetches behind them. With exactly one
    token's top-k per class (slots_per_class=1) every slot is pinned by the step's own experts, so
    no prefetch finds room; with two, the pool fills with in-flight wrong guesses. ``dymoe`` runs
    with a resident copy at the other precision substituting for a stall, and without."""
    runtime, budget = offloaded(store, preset, slots_per_class, depth, substitute=substitute)
    held(runtime)
    total = finishes(lambda: run_offloaded_steps(store, resident, runtime, budget, seed=depth))
    if slots_per_class == 1 and preset != "dymoe":
        assert total["prefetches"] == 0  # every slot pinned by the step itself
    elif slots_per_class == 2:
        assert total["prefetches"] > 0 and total["prefetch_hits"] == 0  # all guesses wrong, all evicted unused


def fill_with_pinned_prefetches(runtime, transfers):
    """Every free slot gets a held (in-flight) prefetch of an expert no step demands, pinned."""
    keys = iter([(l, e) for l in LAYERS for e in range(EXPERTS) if e not in DEMANDED])
    pinned = []
    for precision in runtime.pool.classes:
        while runtime.pool.num_free(precision):
            key = next(keys)
            slot = runtime.cache.make_room(precision, incoming=key)
            runtime.cache.insert(key, precision, slot, prefetched=True)
            transfers.fetch(key, runtime.store.blob(*key, precision), runtime.pool.view(precision, slot))
            runtime.cache.pin(key)
            pinned.append(key)
    return pinned


@pytest.mark.parametrize("preset", ["lru-prefetch", "on-demand-prefetch", "dymoe"])
def test_every_slot_pinned_by_in_flight_prefetches_is_refused_not_awaited(store, resident, held, preset):
    """Prefetched copies still in flight fill the pool and are pinned (through the public cache API:
    the runtime itself never pins a prefetch, so this is the worst state a caller could leave). A
    demand can then free no slot: decode and prefill must end in a clear BudgetError at once, not
    wait on the held copies. Once they land and are unpinned, the same steps run exactly."""
    runtime, budget = offloaded(store, preset, 2, 1)
    transfers = held(runtime, release_on_wait=False)
    pinned = fill_with_pinned_prefetches(runtime, transfers)
    assert all(runtime.pool.num_free(p) == 0 for p in runtime.pool.classes)
    x, ids, weights = token(0), torch.tensor([[0, 1]]), router_weights([0, 1])
    with pytest.raises(BudgetError, match="--device-memory"):
        finishes(lambda: runtime.run_experts(0, x, ids, weights))
    prompt, prompt_ids = torch.randn(3, HIDDEN), torch.tensor([[0, 1], [2, 3], [1, 2]])
    prompt_w = torch.full((3, TOP_K), 1 / TOP_K)
    with pytest.raises(BudgetError, match="--device-memory"):
        finishes(lambda: runtime.run_experts(0, prompt, prompt_ids, prompt_w))
    check_pool(runtime, budget)
    transfers.release_on_wait = True
    for key in pinned:
        runtime.cache.unpin(key)
    out = finishes(lambda: runtime.run_experts(0, x, ids, weights))
    if runtime.low is None:
        assert torch.equal(out, resident.run_experts(0, x, ids, weights))
        assert torch.equal(finishes(lambda: runtime.run_experts(1, prompt, prompt_ids, prompt_w)),
                           resident.run_experts(1, prompt, prompt_ids, prompt_w))
    else:
        served_as(store, 0, x, [0, 1], weights, out)
    check_pool(runtime, budget)


# ---- DynaExq: promotions racing with demand ----------------------------------------------------


def dynaexq(store, low_slots, high_slots, interval=1):
    low, high = store.layout("int4").nbytes, store.layout("bf16").nbytes
    budget = low_slots * low + high_slots * high
    runtime = HotnessExperts(store, HotnessConfig(budget_bytes=budget, interval=interval), TOP_K, "cpu", torch.float32)
    return runtime, budget


ALL = len(LAYERS) * EXPERTS  # every expert's int4 copy


def hot_step(runtime, store, layer, experts, seed=0):
    """One decode step; returns the precision each expert was served at (checked against the store
    and against the hits counted)."""
    x, w = token(seed), router_weights(experts, seed)
    hits = runtime.metrics.total().hits
    out = runtime.run_experts(layer, x, torch.tensor([experts]), w)
    used = served_as(store, layer, x, experts, w, out)
    assert used.count("bf16") == runtime.metrics.total().hits - hits
    return used


def hot_steps(runtime, store, budget, seed, n, release_share):
    """``n`` decode steps of random routing through every layer, each checked by :func:`hot_step`;
    after each, the held copies land with probability ``release_share``."""
    rng = random.Random(seed)
    for i, routing in enumerate(steps(seed, n)):
        for layer in LAYERS:
            hot_step(runtime, store, layer, routing[layer], seed=i)
        if rng.random() < release_share:
            runtime.transfers.release()
        check_hot_pool(runtime, budget)
    return runtime.stats()


def check_hot_pool(runtime, budget):
    assert runtime.pool.capacity_bytes <= budget
    for cache, precision in ((runtime.cache, "bf16"), (runtime.low_cache, "int4")):
        assert runtime.pool.num_free(precision) + len(cache.resident(precision)) == runtime.pool.num_slots(precision)


def test_promotion_in_flight_when_the_same_expert_is_demanded(store, held):
    """One high copy per layer. A promotion issued by one step is still in flight when the next step
    demands the same expert: that step is served by the int4 copy without waiting (the copy is held
    and the engine does not release on wait, so any wait would hang), and once it lands, by bf16."""
    runtime, budget = dynaexq(store, ALL, len(LAYERS))
    assert runtime.high_per_layer == 1 and not runtime.fallback
    transfers = held(runtime, release_on_wait=False)
    assert finishes(lambda: hot_step(runtime, store, 0, [0, 1])) == ("int4", "int4")
    (promoted,) = runtime.cache.resident("bf16")
    assert not transfers.is_done(transfers.pending(promoted))
    assert finishes(lambda: hot_step(runtime, store, 0, [0, 1])) == ("int4", "int4")
    transfers.release()
    transfers.synchronize()
    used = finishes(lambda: hot_step(runtime, store, 0, [0, 1]))
    assert used == tuple("bf16" if (0, e) == promoted else "int4" for e in (0, 1))
    check_hot_pool(runtime, budget)


def test_demotion_skips_copies_in_use(store, held):
    """One high copy per layer, each pinned as if a step were computing with it: a promotion finds
    no victim and is skipped (no error, no wait); unpinned, the copy is demoted for a hotter expert."""
    runtime, budget = dynaexq(store, ALL, len(LAYERS))
    transfers = held(runtime)
    for layer in LAYERS:
        finishes(lambda: hot_step(runtime, store, layer, [0, 1]))
    transfers.release()
    transfers.synchronize()
    in_use = runtime.cache.resident("bf16")
    assert len(in_use) == len(LAYERS)
    for key in in_use:
        runtime.cache.pin(key)
    for i in range(6):  # experts 2 and 3 of layer 0 become the hottest; no slot can be freed
        assert finishes(lambda: hot_step(runtime, store, 0, [2, 3], seed=i)) == ("int4", "int4")
    assert runtime.cache.resident("bf16") == in_use
    check_hot_pool(runtime, budget)
    layer0 = next(k for k in in_use if k[0] == 0)
    runtime.cache.unpin(layer0)
    finishes(lambda: hot_step(runtime, store, 0, [2, 3]))
    assert layer0 not in runtime.cache
    assert [k for k in runtime.cache.resident("bf16") if k[0] == 0][0][1] in (2, 3)
    assert finishes(lambda: hot_step(runtime, store, 0, [layer0[1], 3 if layer0[1] != 3 else 2]))[0] == "int4"
    check_hot_pool(runtime, budget)


@pytest.mark.parametrize("high_slots", [len(LAYERS), ALL])
def test_promotions_racing_demand_never_block(store, held, high_slots):
    """Random routing, a promotion round every step, copies landing at random moments: every step
    returns without waiting, is served by exactly the copies that had landed, and the pool stays
    within the budget with no slot leaked (with room for every expert, promotion rounds look at
    experts never used; a slot taken for one and not filled used to leak)."""
    runtime, budget = dynaexq(store, ALL, high_slots)
    held(runtime, release_on_wait=False)
    stats = finishes(lambda: hot_steps(runtime, store, budget, seed=high_slots, n=30, release_share=0.3))
    assert stats["precision_uses"]["bf16"] > 0 and stats["total"]["prefetches"] > 0
    assert stats["total"]["missed_bytes"] == 0 and stats["total"]["stall_seconds"] == 0.0
    if high_slots == len(LAYERS):
        assert stats["total"]["evictions"] > 0  # demotions happened


def int4_reference(store):
    """Every expert dequantized from its int4 blob, as a resident provider (grouped arithmetic)."""
    layers = {}
    for l in LAYERS:
        parts = [unpack_expert(store.blob(l, e, "int4"), store.layout("int4"), torch.float32) for e in range(EXPERTS)]
        layers[l] = (torch.stack([torch.cat([g, u]) for g, u, _ in parts]), torch.stack([d for _, _, d in parts]))
    return ResidentExperts(layers, gather_decode=False)


@pytest.mark.parametrize("low_slots, high_slots", [(ALL // 2, TOP_K), (TOP_K, TOP_K), (TOP_K, 0)])
def test_fallback_offloads_the_low_tier_and_keeps_promoting(store, held, capsys, low_slots, high_slots):
    """Not every int4 copy fits: one line on stderr says how many do; prefill and decode fetch the
    missing int4 copies on demand (the step waits: missed bytes and stalls are counted) while
    promotions continue, and every output equals the store's reference at the precisions served."""
    runtime, budget = dynaexq(store, low_slots, high_slots)
    message = capsys.readouterr().err
    assert runtime.fallback and message.count("\n") == 1
    assert f"{low_slots} of {ALL} int4 copies ({100 * low_slots / ALL:.0f}%) fit" in message
    assert runtime.pool.counts == {"bf16": high_slots, "int4": low_slots}
    held(runtime)
    prompt, ids = torch.randn(6, HIDDEN), torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(6)])
    w = torch.softmax(torch.randn(6, TOP_K), -1)
    exact = int4_reference(store)

    def work():
        for layer in LAYERS:
            out = runtime.run_experts(layer, prompt, ids, w)
            assert torch.allclose(out, exact.run_experts(layer, prompt, ids, w), rtol=1e-5, atol=1e-6)
        return hot_steps(runtime, store, budget, seed=low_slots, n=20, release_share=0.5)

    stats = finishes(work)["total"]
    assert stats["missed_bytes"] > 0 and stats["h2d_bytes"] >= stats["missed_bytes"]
    assert (stats["prefetches"] > 0) == (high_slots > 0)


def test_budget_below_one_tokens_int4_experts_is_refused(store):
    low = store.layout("int4").nbytes
    with pytest.raises(BudgetError, match=r"one token's 2 experts at int4.*at least 0\.04 MiB"):
        HotnessExperts(store, HotnessConfig(budget_bytes=TOP_K * low - 1), TOP_K, "cpu", torch.float32)
