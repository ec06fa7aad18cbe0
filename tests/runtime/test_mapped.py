"""The mapped decode (dymoe/runtime/mapped.py): an offloading runtime's decode step with its experts
found through a device table, wherever they lie, and the cache run a step behind. On the CPU
(``DYMOE_MAPPED_DECODE=1``) through the decode-graph path without recording, against the
segmented decode and the resident model."""

from __future__ import annotations

import pytest
import torch

from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.errors import InputError
from dymoe.models.decode_graphs import DecodeGraphs
from dymoe.models.transformer import load_dense
from dymoe.runtime import mapped
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.presets import PRESETS
from dymoe.runtime.resident import ResidentExperts
from tests.interpreted import needs_gpu, needs_triton, run_interpreted
from tests.tiny_models import tiny_store

PROMPTS = (torch.tensor([[1, 17, 42, 5, 63, 8, 29, 11]]), torch.tensor([[3, 9, 27, 81, 50]]))
STEPS = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, its store on disk, the same blobs all in host memory)."""
    checkpoint, store = tiny_store(tmp_path_factory.mktemp("mapped"), "qwen3_moe", 7, ("bf16", "int4"))
    return checkpoint, store, MemoryStore.pin_from(store, store.nbytes())


def runtime(checkpoint, store, preset: str, slots: int, setting: str, monkeypatch, device="cpu",
            dtype=torch.float32, **knobs):
    monkeypatch.setattr(mapped, "MAPPED", setting)
    c = checkpoint.config
    config = dict(PRESETS[preset], **knobs)
    one = store.layout(config["precision"]).nbytes
    return OffloadedExperts(store, OffloadConfig(budget_bytes=slots * one, **config), c.num_experts_per_tok,
                            device, dtype)


def decode(model, experts, device="cpu"):
    """Each of PROMPTS on a fresh cache (the second prefill runs between decode steps): the prompt's
    logits, then STEPS greedy steps through the decode-graph path (recorded on a GPU)."""
    model.attach_experts(experts)
    trail = []
    for prompt in PROMPTS:
        cache = model.new_cache(1)
        logits = model(prompt.to(device), 0, cache, last_only=True)[0]
        steps = DecodeGraphs(model, cache, record=device != "cpu")
        for i in range(STEPS):
            trail.append(logits)
            logits = steps.step(logits.argmax(), prompt.shape[1] + i)
    return torch.stack(trail)


@pytest.mark.parametrize("preset", ["lru", "static-int4"])
@pytest.mark.parametrize("share", ["top-k", "half", "twice"])
def test_mapped_decode_gives_the_segmented_decodes_logits(tiny, monkeypatch, preset, share):
    """The same logits bit for bit as the same preset decoding through its own slots, at a budget of
    one token's top-k slots (evictions at every layer), of half the experts, and of twice them (the
    misses fall to none after the prefill, so the ring holds more than the recent misses ask for);
    bf16 ``lru`` also as the resident model (invariant 2). No step takes the host's per-layer path
    (``_admit``)."""
    checkpoint, _, host = tiny
    c = checkpoint.config
    every = len(c.moe_layers) * c.num_experts
    slots = {"top-k": c.num_experts_per_tok, "half": every // 2, "twice": 2 * every}[share]
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    segmented = decode(model, runtime(checkpoint, host, preset, slots, "0", monkeypatch))
    experts = runtime(checkpoint, host, preset, slots, "1", monkeypatch)
    assert experts.mapped_decode is not None
    admitted = []
    admit = experts._admit
    experts._admit = lambda *args, **kw: admitted.append(args[0]) or admit(*args, **kw)
    graphs = decode(model, experts)
    assert torch.equal(graphs, segmented)
    assert admitted == []
    if preset == "lru":
        resident = decode(model, ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.float32))
        assert torch.equal(graphs, resident)
    _check_table(experts)


@needs_gpu
@pytest.mark.parametrize("preset", ["lru", "static-int4"])
def test_mapped_decode_on_the_gpu(tiny, monkeypatch, preset):
    """On a GPU (CUDA graphs recorded, the compiled kernels reading missed experts from pinned host
    memory over the link): the same logits bit for bit as the segmented decode, and bf16 ``lru``
    as the resident model. (CI has no GPU: ``python -m pytest tests/runtime/test_mapped.py``.)"""
    checkpoint, _, host = tiny
    assert host.buffer.is_pinned()
    c = checkpoint.config
    slots = c.num_experts_per_tok + 2
    model = load_dense(checkpoint, 64, "cuda", torch.bfloat16)
    on_gpu = dict(device="cuda", dtype=torch.bfloat16)
    segmented = decode(model, runtime(checkpoint, host, preset, slots, "0", monkeypatch, **on_gpu), "cuda")
    experts = runtime(checkpoint, host, preset, slots, "1", monkeypatch, **on_gpu)
    assert experts.mapped_decode is not None
    graphs = decode(model, experts, "cuda")
    assert torch.equal(graphs, segmented)
    assert experts.stats()["total"]["misses"] > 0  # some experts were read over the link
    if preset == "lru":
        resident = decode(model, ResidentExperts.from_checkpoint(checkpoint, "cuda", torch.bfloat16), "cuda")
        assert torch.equal(graphs, resident)
    _check_table(experts)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v2", "mixtral"])
def test_mapped_decode_in_other_families(tmp_path, monkeypatch, family):
    """The same logits bit for bit as the segmented decode for GPT-OSS (biased experts, read from
    the blob wherever it lies), DeepSeek-V2 (a dense first layer and shared experts: the table's
    rows are the MoE layers only) and Mixtral (top-2), with slots for a third of the experts."""
    checkpoint, store = tiny_store(tmp_path, family, 5, ("bf16", "int4"))
    host = MemoryStore.pin_from(store, store.nbytes())
    c = checkpoint.config
    slots = len(c.moe_layers) * c.num_experts // 3
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    for preset in ("lru", "static-int4"):
        segmented = decode(model, runtime(checkpoint, host, preset, slots, "0", monkeypatch))
        experts = runtime(checkpoint, host, preset, slots, "1", monkeypatch)
        assert torch.equal(decode(model, experts), segmented), preset
        assert experts.mapped_decode.steps == len(PROMPTS) * STEPS
        assert experts.stats()["total"]["misses"] > 0
        _check_table(experts)


def test_a_step_cut_short_leaves_nothing_stale(tiny, monkeypatch):
    """An exception inside a step (here right after a fill that overwrote a cached copy's slot,
    news the host never gets) gives up the ring's slots, and the step run again and the ones after
    it give the segmented decode's logits, with every table entry and slot consistent."""
    checkpoint, _, host = tiny
    c = checkpoint.config
    slots = len(c.moe_layers) * c.num_experts // 2
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    segmented = decode(model, runtime(checkpoint, host, "lru", slots, "0", monkeypatch))[:STEPS]
    experts = runtime(checkpoint, host, "lru", slots, "1", monkeypatch)
    m = experts.mapped_decode
    model.attach_experts(experts)
    cache = model.new_cache(1)
    logits = model(PROMPTS[0], 0, cache, last_only=True)[0]
    steps, trail, cut = DecodeGraphs(model, cache, record=False), [], []
    compute = m.compute

    def cutting(layer, *args):
        out = compute(layer, *args)
        taken = [p for p in m.record[m.rows[layer], 1].tolist() if p >= 0]
        if not cut and any(m.victims[p % m.cap] is not None for p in taken):
            cut.append((layer, m.tail))
            raise KeyboardInterrupt
        return out

    m.compute = cutting
    for i in range(STEPS):
        trail.append(logits)
        try:
            logits = steps.step(logits.argmax(), PROMPTS[0].shape[1] + i)
        except KeyboardInterrupt:
            assert m.dirty and m.head == m.tail == cut[0][1]
            for key in experts.cache.resident("bf16"):  # every copy the cache keeps is still whole
                assert torch.equal(experts.pool.view("bf16", experts.cache.peek(key).slot), host.blob(*key, "bf16")), key
            logits = steps.step(logits.argmax(), PROMPTS[0].shape[1] + i)
    assert cut, "no fill took a cached copy's slot: the test needs a smaller budget"
    assert torch.equal(torch.stack(trail), segmented)
    _check_table(experts)


def test_forgetting_the_warm_up_empties_the_cache_and_the_ring(tiny, monkeypatch):
    """``forget_warm_up`` (after the engine's throwaway token) in the middle of the mapped decode:
    the ring's slots and every cached copy go back to the pool, and the decode that follows gives
    the segmented decode's logits with a consistent table."""
    checkpoint, _, host = tiny
    c = checkpoint.config
    slots = len(c.moe_layers) * c.num_experts // 2
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    segmented = decode(model, runtime(checkpoint, host, "lru", slots, "0", monkeypatch))
    experts = runtime(checkpoint, host, "lru", slots, "1", monkeypatch)
    model.attach_experts(experts)
    cache = model.new_cache(1)
    logits = model(PROMPTS[1], 0, cache, last_only=True)[0]
    steps = DecodeGraphs(model, cache, record=False)
    for i in range(3):
        logits = steps.step(logits.argmax(), PROMPTS[1].shape[1] + i)
    m = experts.mapped_decode
    assert m.tail > m.head and experts.cache.resident("bf16")  # slots set aside, copies pinned for fills
    experts.forget_warm_up()
    assert experts.cache.resident() == [] and m.tail == m.head
    assert experts.pool.num_free("bf16") == slots
    assert experts.stats()["total"]["tokens"] == 0
    assert torch.equal(decode(model, experts), segmented)
    _check_table(experts)


def _check_table(experts) -> None:
    """Every table entry points at its expert's bytes: a cached expert's slot (which holds its blob)
    or its blob in the host store; and every slot of the class is cached, set aside for fills or
    free (none leaks)."""
    m = experts.mapped_decode
    m.settle_pending()
    m._send()
    table = m.table.cpu().numpy()
    for layer, r in m.rows.items():
        for e in range(experts.store.num_experts):
            key, blob = (layer, e), experts.store.blob(layer, e, m.precision)
            resident = experts.cache.peek(key)
            if resident is None:
                assert table[r, e] == m.away[r, e], key
            else:
                assert table[r, e] == experts.pool.offset(m.precision, resident.slot), key
            assert torch.equal(m._bytes_at(int(table[r, e])).cpu(), blob), key
    pool = experts.pool
    cached = len(experts.cache.resident(m.precision))
    assert cached + m.free_in_ring + pool.num_free(m.precision) == pool.num_slots(m.precision)


def test_a_miss_is_filled_in_its_step(tiny, monkeypatch):
    """With room for every expert and a ring as large as a step's uses: an expert the decode first
    uses at step t is copied from the host into a slot by the step itself (a miss, its bytes
    crossing the link once) and hit from t+1 on. The misses counted equal the first uses, hits +
    misses every use, and the link bytes one blob per miss. The host enters a fill into the cache
    a step late."""
    monkeypatch.setattr(mapped, "RECENT", 10 ** 6)  # the ring keeps its first size: it never runs out
    checkpoint, _, host = tiny
    c = checkpoint.config
    experts = runtime(checkpoint, host, "static-int4", 4 * len(c.moe_layers) * c.num_experts, "1", monkeypatch)
    m = experts.mapped_decode
    assert m.most == len(c.moe_layers) * c.num_experts_per_tok
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    model.attach_experts(experts)
    cache = model.new_cache(1)
    logits = model(PROMPTS[0], 0, cache, last_only=True)[0]
    cached = set(experts.cache.resident("int4"))
    experts.metrics.reset()
    steps = DecodeGraphs(model, cache, record=False)
    uses = []
    for i in range(STEPS):
        logits = steps.step(logits.argmax(), PROMPTS[0].shape[1] + i)
        uses.append({(layer, e) for layer, row in zip(m.layers, m.record[:, 0].tolist()) for e in row})
        known = set(experts.cache.resident("int4"))
        assert known == cached.union(*uses[:-1]), i  # this step's fills are entered after the next
    total = experts.stats()["total"]
    first_uses = len(set().union(*uses) - cached)
    assert first_uses > 0
    assert total["misses"] == first_uses
    assert total["hits"] + total["misses"] == STEPS * len(c.moe_layers) * c.num_experts_per_tok
    assert total["h2d_bytes"] == first_uses * host.layout("int4").nbytes
    assert total["tokens"] == STEPS and m.steps == STEPS
    _check_table(experts)


def test_mapped_decode_applies_to_one_class_in_host_memory(tiny, monkeypatch, capsys):
    """Only where ``DYMOE_MAPPED_DECODE=1`` asks (off by default), and only for a single-class
    runtime without a prefetcher that keeps experts across layers, over a host store holding every
    blob of its class; asked for where it does not apply, one line on stderr says why."""
    checkpoint, disk, host = tiny
    k = checkpoint.config.num_experts_per_tok
    on = lambda store=host, preset="static-int4", setting="1", **knobs: runtime(
        checkpoint, store, preset, 2 * k, setting, monkeypatch, **knobs).mapped_decode is not None
    assert on() and on(preset="lru") and capsys.readouterr().err == ""
    assert not on(setting="0") and capsys.readouterr().err == ""
    refusals = {  # blobs on disk, or only the bf16 ones in host memory: nothing to read int4 from in place
        "does not hold every int4 expert (raise --host-memory)": [dict(store=disk),
                                                                dict(store=MemoryStore.pin_from(disk, host.nbytes("bf16")))],
        "prefetches": [dict(prefetch_depth=1)],
        "keeps no expert across layers": [dict(keep_across_layers=False)],
        "two precision classes": [dict(preset="dymoe")],
    }
    for reason, cases in refusals.items():
        for case in cases:
            assert not on(**case), case
            err = capsys.readouterr().err
            assert err.startswith("dymoe: DYMOE_MAPPED_DECODE=1 does not apply: ") and reason in err, (case, err)
            assert err.count("\n") == 1, err


def test_auto_maps_a_gpu_runtime_whose_pool_holds_most_of_its_class(tiny, monkeypatch):
    """``DYMOE_MAPPED_DECODE`` is ``auto`` by default: mapped on a GPU where the pool has slots for
    90% of its class's experts (never on the CPU, where it is the tests' reference); ``1`` and
    ``0`` say always and never; a bad value is a clear error."""
    monkeypatch.delenv("DYMOE_MAPPED_DECODE", raising=False)
    assert mapped._setting() == "auto"
    monkeypatch.setenv("DYMOE_MAPPED_DECODE", "1")
    assert mapped._setting() == "1"
    monkeypatch.setenv("DYMOE_MAPPED_DECODE", "on")
    with pytest.raises(InputError, match="DYMOE_MAPPED_DECODE='on': use auto .* or 1 .* or 0"):
        mapped._setting()
    checkpoint, _, host = tiny
    c = checkpoint.config
    experts = len(c.moe_layers) * c.num_experts  # 24
    made = lambda slots, setting: runtime(checkpoint, host, "static-int4", slots, setting, monkeypatch).mapped_decode
    assert made(experts, "auto") is None and made(experts, "1") is not None  # the CPU
    on_gpu = runtime(checkpoint, host, "static-int4", experts, "auto", monkeypatch)
    on_gpu.device = torch.device("cuda")  # as the rule sees it
    assert mapped._covered(on_gpu)
    for slots, covered in ((22, True), (21, False), (12, False)):  # 0.9 * 24 = 21.6
        small = runtime(checkpoint, host, "static-int4", slots, "auto", monkeypatch)
        small.device = torch.device("cuda")
        assert mapped._covered(small) == covered, slots


_INTERPRETED = r"""
import json, tempfile
from pathlib import Path
import torch
from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.models.decode_graphs import DecodeGraphs
from dymoe.models.transformer import load_dense
from dymoe.quant.kernels import triton_experts
from dymoe.runtime import mapped
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.presets import PRESETS
from tests.tiny_models import tiny_store

prepacked = [0]
launch = triton_experts.launch_decode
def counted(*args, x_packed=None, **kwargs):
    prepacked[0] += x_packed is not None
    return launch(*args, x_packed=x_packed, **kwargs)
triton_experts.launch_decode = counted

checkpoint, disk = tiny_store(Path(tempfile.mkdtemp()), "qwen3_moe", 7, ("bf16", "int4"))
host = MemoryStore.pin_from(disk, disk.nbytes())
model = load_dense(checkpoint, 32, "cpu", torch.bfloat16)
k = checkpoint.config.num_experts_per_tok
out = {}
for preset in ("lru", "static-int4"):
    trails = []
    for setting in ("0", "1", "1-self-packed"):  # the last: the step packs its input, not the router
        mapped.MAPPED = setting[0]
        knobs = PRESETS[preset]
        budget = 4 * k * host.layout(knobs["precision"]).nbytes
        experts = OffloadedExperts(host, OffloadConfig(budget_bytes=budget, **knobs), k, "cpu", torch.bfloat16)
        out[preset + " packing " + setting] = experts._packing is not None
        if setting == "1-self-packed":
            experts._packing = None
        fills = []
        if setting == "1":
            enter = experts.mapped_decode._enter
            experts.mapped_decode._enter = lambda key, position: fills.append(key) or enter(key, position)
        model.attach_experts(experts)
        cache = model.new_cache(1)
        logits = model(torch.tensor([[1, 17, 42, 5, 63]]), 0, cache, last_only=True)[0]
        experts.metrics.reset()
        steps, trail = DecodeGraphs(model, cache, record=False), []
        prepacked[0] = 0
        for i in range(3):
            logits = steps.step(logits.argmax(), 5 + i)
            trail.append(logits)
        trails.append(torch.stack(trail))
        out[preset + " prepacked steps " + setting] = prepacked[0]
        if setting == "1":
            out[preset + " kernels"] = experts.mapped_decode.kernels
            out[preset + " misses"] = experts.stats()["total"]["misses"]
            out[preset + " fills"] = len(fills)
            out[preset + " slots hold their blobs"] = all(
                torch.equal(experts.pool.view(knobs["precision"], experts.cache.peek(key).slot),
                            host.blob(*key, knobs["precision"]))
                for key in experts.cache.resident(knobs["precision"]))
    out[preset] = bool(torch.equal(*trails[:2]))
    out[preset + " self-packed"] = bool(torch.equal(trails[1], trails[2]))
    out["moe_layers"] = len(checkpoint.config.moe_layers)
    out[preset + " rel_err"] = float((trails[1].float() - trails[0].float()).norm() / trails[0].float().norm())
print(json.dumps(out))
"""


@needs_triton
def test_mapped_decode_through_the_kernels_under_the_interpreter(monkeypatch):
    """The kernels path (Triton's interpreter on the CPU): the fill launch copies missed experts'
    blobs from the host store into ring slots (each cached slot then holds its expert's blob), and
    the expert kernels read them, or the host blobs in place where the ring ran out. bf16 (``lru`` under
    ``DYMOE_RESIDENT_DECODE=kernels``, the kernels both ways) gives the segmented decode's logits
    bit for bit; int4, whose segmented decode runs the torch reference on the CPU, agrees to bf16
    rounding. int4's mapped steps take their input packed by the router (InputPacking), with the
    same logits bit for bit as where each step packs its own."""
    monkeypatch.setenv("DYMOE_RESIDENT_DECODE", "kernels")
    results = run_interpreted(_INTERPRETED, timeout=900)
    assert results["static-int4 packing 1"] and not results["lru packing 1"], results  # (bf16 packs nothing)
    assert results["static-int4 prepacked steps 1"] == 3 * results["moe_layers"], results
    assert results["static-int4 prepacked steps 1-self-packed"] == 0 == results["lru prepacked steps 1"], results
    assert results["static-int4 self-packed"] and results["lru self-packed"], results
    assert results["lru kernels"] and results["static-int4 kernels"], results
    assert results["lru misses"] > 0 and results["static-int4 misses"] > 0, results
    assert results["lru fills"] > 0 and results["static-int4 fills"] > 0, results
    assert results["lru slots hold their blobs"] and results["static-int4 slots hold their blobs"], results
    assert results["lru"], results
    assert results["static-int4 rel_err"] < 1e-2, results


_FILL_AGAINST_REFERENCE = r"""
import json, random, tempfile
from pathlib import Path
import torch
from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.runtime import mapped
from dymoe.runtime.mapped_fill import launch_apply, launch_fill
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.presets import PRESETS
from tests.tiny_models import tiny_store

DEVICE, SLOTS = "%s", 8
checkpoint, disk = tiny_store(Path(tempfile.mkdtemp()), "qwen3_moe", 7, ("bf16",))
host = MemoryStore.pin_from(disk, disk.nbytes())
mapped.MAPPED = "1"
k = checkpoint.config.num_experts_per_tok
budget = SLOTS * host.layout("bf16").nbytes
experts = OffloadedExperts(host, OffloadConfig(budget_bytes=budget, **PRESETS["lru"]), k, DEVICE, torch.bfloat16)
m, pool = experts.mapped_decode, experts.pool
rows, n, cap = len(m.layers), m.experts, m.cap
names = ("table", "inbox", "heads", "record", "offsets")
rng = random.Random(0)
counts = dict(cases=0, differ=0, fills=0, evictions=0, in_place=0, stopped=0)


def state():
    # experts in slots (their blobs copied there), the rest on the host; a ring of free slots and
    # of cached copies; k routed experts of one row, half the time a cached copy in the ring among them
    cached = rng.sample([(r, e) for r in range(rows) for e in range(n)], rng.randint(0, SLOTS))
    table = torch.tensor(m.away)
    for slot, (r, e) in enumerate(cached):
        table[r, e] = pool.offset("bf16", slot)
        pool.view("bf16", slot).copy_(host.blob(m.layers[r], e, "bf16"))
    offers = [(pool.offset("bf16", s), -1, 0) for s in range(len(cached), SLOTS)]
    offers += [(int(table[r, e]), r * n + e, int(m.away[r, e])) for r, e in cached]
    rng.shuffle(offers)
    offers = offers[:rng.randint(0, cap)]
    head, row = rng.randint(0, 3 * cap), rng.randrange(rows)
    inbox = torch.zeros(1 + 3 * cap, dtype=torch.int64)
    inbox[0] = head + max(len(offers) - rng.randint(0, 1), 0)  # sometimes the last is not offered yet
    for p, offer in enumerate(offers):
        inbox[1 + (head + p) %% cap::cap] = torch.tensor(offer)
    heads = torch.zeros(rows + 1, dtype=torch.int64)
    heads[row] = head
    ids = rng.sample(range(n), k)
    ring_victims = [v - row * n for _, v, _ in offers if v >= 0 and v // n == row]
    if ring_victims and rng.random() < 0.5 and ring_victims[0] not in ids:
        ids[0] = ring_victims[0]
    return row, torch.tensor(ids), dict(table=table, inbox=inbox, heads=heads,
                                         record=torch.zeros(rows, 2, k, dtype=torch.int64),
                                         offsets=torch.zeros(rows, k, dtype=torch.int64)), len(offers)


for case in range(60):
    row, ids, start, offered = state()
    before, results = pool.buffer.clone(), []
    for kernel in (True, False):
        pool.buffer.copy_(before)
        for name in names:
            getattr(m, name).copy_(start[name])
        if kernel:
            launch_fill(m._words, ids.to(DEVICE), m.table, m.inbox, m.heads, m.record, m.offsets, row, cap, m.nbytes, 4)
            if row == rows - 1:
                launch_apply(m.table, m.inbox, m.heads, m.record, cap)
        else:
            m._fill_reference(row, ids.to(DEVICE))
            if row == rows - 1:
                m._apply_reference()
        results.append([getattr(m, name).cpu().clone() for name in names] + [pool.buffer.cpu().clone()])
    outcomes = results[0][3][row, 1]
    taken = int((outcomes >= 0).sum())
    counts["cases"] += 1
    counts["differ"] += any(not torch.equal(a, b) for a, b in zip(*results))
    counts["fills"] += taken
    counts["evictions"] += int((results[0][0] != start["table"]).sum()) - (taken if row == rows - 1 else 0)
    counts["in_place"] += int((outcomes == -1).sum())
    counts["stopped"] += int(bool((outcomes == -1).any()) and taken < start["inbox"][0] - start["heads"][row])
print(json.dumps(counts))
"""


def _fill_against_reference(device: str, interpret: bool) -> dict:
    counts = run_interpreted(_FILL_AGAINST_REFERENCE % device, timeout=900, interpret=interpret)
    assert counts["differ"] == 0, counts
    assert min(counts["fills"], counts["evictions"], counts["in_place"], counts["stopped"]) > 0, counts
    return counts


@needs_triton
def test_the_fill_launch_matches_its_reference_under_the_interpreter():
    """The fill launch and the step's last launch (Triton's interpreter) leave the table, the ring's
    head, the record, the experts' offsets and every pool byte exactly as the torch reference does,
    over random states: free slots and cached copies in the ring, a ring that runs out, and a layer
    hitting a copy the ring offers (the fills stop before it)."""
    _fill_against_reference("cpu", interpret=True)


@needs_gpu
def test_the_fill_launch_matches_its_reference_on_the_gpu():
    """As above, compiled on a GPU, the missed blobs read from pinned host memory over the link."""
    _fill_against_reference("cuda", interpret=False)
