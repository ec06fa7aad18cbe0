"""DyMoE's mixed precision in the offloading runtime: importance, depth floors, substitution."""

from __future__ import annotations

import pytest
import torch

from dymoe.errors import BudgetError
from dymoe.models.transformer import load_dense
from dymoe.quant.kernels import InputPacking
from dymoe.runtime import offload
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.precision import important_count
from dymoe.runtime.presets import PRESETS
from dymoe.runtime.resident import ResidentExperts
from tests.tiny_models import tiny_store


@pytest.mark.parametrize(
    "weights,mass,expected",
    [
        ([0.5, 0.3, 0.1, 0.1], 0.5, 1),  # the first expert alone reaches half the mass
        ([0.4, 0.3, 0.2, 0.1], 0.5, 2),
        ([0.4, 0.3, 0.2, 0.1], 0.75, 3),
        ([0.25, 0.25, 0.25, 0.25], 0.5, 2),
        ([0.9, 0.05, 0.05], 0.0, 1),  # at least one expert is always important
        ([0.3, 0.3, 0.4], 1.0, 3),
    ],
)
def test_important_count(weights, mass, expected):
    assert int(important_count(torch.tensor(weights), mass)) == expected


@pytest.fixture(scope="module")
def model_and_store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("mixed"), "qwen3_moe", 21, ("bf16", "int4"), num_hidden_layers=4)


def runtime(checkpoint, store, slots_each: int, **knobs):
    layouts = store.layout("bf16").nbytes, store.layout("int4").nbytes
    budget = 2 * slots_each * max(layouts)  # high_share 0.5: at least slots_each of each class
    config = OffloadConfig(budget_bytes=budget, **{**PRESETS["dymoe"], "prefetch_depth": 0, **knobs})
    return OffloadedExperts(store, config, checkpoint.config.num_experts_per_tok, "cpu", torch.float32), budget


def decode(model, experts, steps=12):
    model.attach_experts(experts)
    cache = model.new_cache(1)
    logits = model(torch.tensor([[1, 17, 42, 5, 63]]), 0, cache, last_only=True)[0]
    out = []
    for i in range(steps):
        token = logits.argmax()
        out.append(logits)
        logits = model(token.view(1, 1), 5 + i, cache, last_only=True)[0]
    return torch.stack(out)


def test_mixed_precision_uses_both_classes_within_budget(model_and_store):
    checkpoint, store = model_and_store
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    experts, budget = runtime(checkpoint, store, slots_each=6)
    logits = decode(model, experts)
    uses = experts.stats()["precision_uses"]
    assert uses["bf16"] > 0 and uses["int4"] > 0
    assert experts.pool.capacity_bytes <= budget
    reference = decode(model, ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.float32))
    assert not torch.equal(logits, reference)  # int4 is really used
    torch.testing.assert_close(logits.softmax(-1), reference.softmax(-1), atol=0.05, rtol=0)


def test_critical_layers_run_only_high_precision(model_and_store):
    checkpoint, store = model_and_store
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    every = tuple(range(len(checkpoint.config.moe_layers)))
    experts, _ = runtime(checkpoint, store, slots_each=6, critical_layers=every)
    logits = decode(model, experts)
    assert experts.stats()["precision_uses"]["int4"] == 0
    reference = decode(model, ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.float32))
    assert torch.equal(logits, reference)  # all bf16 and the same arithmetic: bit-identical


def test_low_copy_substitutes_instead_of_a_fetch(model_and_store):
    checkpoint, store = model_and_store
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    k = checkpoint.config.num_experts_per_tok
    for substitute, expect_fetch in ((True, False), (False, True)):
        experts, _ = runtime(checkpoint, store, slots_each=8, substitute=substitute)
        model.attach_experts(experts)
        layer = checkpoint.config.moe_layers[1]
        ids = torch.arange(k).view(1, -1)
        weights = torch.full((1, k), 1.0 / k)
        hidden = torch.randn(1, checkpoint.config.hidden_size)
        # every expert resident at int4 already; equal weights make the first two important (bf16)
        for e in range(k):
            slot = experts.cache.make_room("int4")
            experts.cache.insert((layer, e), "int4", slot)
            experts.pool.view("int4", slot).copy_(store.blob(layer, e, "int4"))
        before = experts.stats()["total"]["misses"]
        experts.run_experts(layer, hidden, ids, weights)
        fetched = experts.stats()["total"]["misses"] - before
        assert (fetched > 0) == expect_fetch, substitute


def test_each_class_holds_a_token_whatever_the_share(model_and_store):
    """A skewed share shifts bytes to the class that would fall short; a budget below one token's
    top-k in both classes is refused with that minimum."""
    checkpoint, store = model_and_store
    k = checkpoint.config.num_experts_per_tok
    bf16, int4 = store.layout("bf16").nbytes, store.layout("int4").nbytes
    floor = k * (bf16 + int4)
    for budget in (floor, floor + bf16 // 2, 2 * floor + 3 * int4):
        experts = OffloadedExperts(store, OffloadConfig(budget_bytes=budget, precision="bf16", low_precision="int4",
                                                        high_share=0.95), k, "cpu", torch.float32)
        counts = experts.pool.counts
        assert min(counts.values()) >= k, counts
        assert counts["bf16"] * bf16 + counts["int4"] * int4 <= budget
        assert experts.pool.capacity_bytes <= budget
    with pytest.raises(BudgetError, match=f"{k} bf16 \\+ {k} int4") as info:
        OffloadedExperts(store, OffloadConfig(budget_bytes=floor - 1, precision="bf16", low_precision="int4",
                                              high_share=0.95), k, "cpu", torch.float32)
    assert f"{floor / 2**20:.1f} MiB" in str(info.value)


def place(experts, store, layer: int, expert: int, precision: str, poison: bool = False) -> int:
    """Make ``expert`` resident at ``precision`` in the lowest free slot (its blob, or NaN bytes)."""
    slot = experts.cache.make_room(precision)
    experts.cache.insert((layer, expert), precision, slot)
    view = experts.pool.view(precision, slot)
    view.copy_(torch.full_like(view, 0xFF) if poison else store.blob(layer, expert, precision))
    return slot


def test_deferred_two_class_decode_uploads_each_class_slots_and_mask(model_and_store):
    """A hand-made routing whose important expert (5) is resident only at int4 (it substitutes),
    an unimportant one (2) resident at bf16 (a high copy always serves) and one (7) missing (fetched
    at int4): each class gets a row of k slot ids (slot 0 where the expert runs at the other class)
    and a 0/1 mask row. Slot 0 of both classes holds NaN bytes: a padded column whose weights were
    read would poison the output, which must equal the eager decode's."""
    checkpoint, store = model_and_store
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    experts, _ = runtime(checkpoint, store, slots_each=6)
    model.attach_experts(experts)
    assert experts.deferred_decode
    layer = checkpoint.config.moe_layers[1]  # not critical
    assert [place(experts, store, layer, e, p, poison=True) for e, p in ((0, "bf16"), (1, "int4"))] == [0, 0]
    assert place(experts, store, layer, 5, "int4") == 1 and place(experts, store, layer, 2, "bf16") == 1
    ids, weights = torch.tensor([5, 2, 7]), torch.tensor([0.6, 0.3, 0.1])  # mass 0.5: only expert 5 is important
    hidden = torch.randn(1, checkpoint.config.hidden_size, generator=torch.Generator().manual_seed(0))

    experts.decode_prepare(layer, hidden, ids, weights)
    rows = experts._padded_rows(3).tolist()
    assert rows == [[0, 1, 0], [0, 1, 0],  # bf16: slots, mask (expert 2)
                    [1, 0, 2], [1, 0, 1]]  # int4: slots, mask (experts 5 and 7; 7 fetched into slot 2)
    out = experts.decode_compute(layer, hidden, weights)
    experts.decode_finish(layer)
    assert not any(experts.cache.is_pinned((layer, e)) for e in (5, 2, 7))

    assert torch.isfinite(out).all()
    eager = experts._decode_one(layer, hidden, ids, weights)  # same residency: the same classes
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    int4_only = experts._decode_one(layer, hidden, ids, weights * torch.tensor([1.0, 0.0, 1.0]))
    assert not torch.allclose(out, int4_only, rtol=1e-3, atol=1e-5)  # the bf16 expert counts


def test_deferred_decode_launches_only_the_classes_a_layer_can_use(model_and_store):
    """Critical layers, and Fate's rule without substitution, run every decode expert high: their
    recording leaves out the low class."""
    checkpoint, store = model_and_store
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    layers = checkpoint.config.moe_layers
    experts, _ = runtime(checkpoint, store, slots_each=6)  # dymoe: first and last MoE layer critical
    model.attach_experts(experts)
    assert [experts._decode_classes(layer) for layer in layers] == [("bf16",), *[("bf16", "int4")] * (len(layers) - 2),
                                                                     ("bf16",)]
    for substitute, classes in ((False, ("bf16",)), (True, ("bf16", "int4"))):
        popular, _ = runtime(checkpoint, store, slots_each=6, precision_rule="popularity", critical_layers=(),
                             substitute=substitute)
        model.attach_experts(popular)
        assert {popular._decode_classes(layer) for layer in layers} == {classes}, substitute


@pytest.mark.parametrize("capturable", [True, False])
def test_low_bit_classes_defer_only_where_the_fused_kernels_run(model_and_store, monkeypatch, capturable):
    """The deferred decode runs low-bit classes through expert_decode, which a CUDA graph can record
    only through the Triton kernels (on a GPU without Triton the torch reference reads slot offsets
    on the host): one class or two, they defer only where expert_decode_capturable says so; a single
    bf16 class is read in place and always defers."""
    checkpoint, store = model_and_store
    monkeypatch.setattr(offload, "expert_decode_capturable", lambda device: capturable)
    mixed, _ = runtime(checkpoint, store, slots_each=6)
    k = checkpoint.config.num_experts_per_tok
    int4 = OffloadedExperts(store, OffloadConfig(budget_bytes=k * store.layout("int4").nbytes, precision="int4"), k,
                            "cpu", torch.float32)
    assert mixed.deferred_decode == int4.deferred_decode == capturable
    bf16 = OffloadedExperts(store, OffloadConfig(budget_bytes=k * store.layout("bf16").nbytes), k, "cpu", torch.float32)
    assert bf16.deferred_decode


def test_start_up_compiles_every_decode_launch_of_both_paths(model_and_store, monkeypatch):
    """On the GPU, _compile_kernels runs each fused decode launch once: bf16 with k columns (the
    deferred decode; the eager one reads bf16 slots in place), int4 with 1..k (the eager decode
    splits a token's experts between the classes; the deferred one passes k), in the model's
    activation. Here the workspaces stand in for the GPU's and expert_decode records its calls."""
    checkpoint, store = model_and_store
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    k = checkpoint.config.num_experts_per_tok
    experts, _ = runtime(checkpoint, store, slots_each=6)
    model.attach_experts(experts)
    assert set(experts._workspaces) == {"bf16", "int4"}  # None on the CPU: the torch reference needs none
    experts._workspaces = {p: object() for p in experts._workspaces}
    launches = []
    monkeypatch.setattr(offload, "routed_decode", lambda pool, table, slots, weights, layout, x, workspace, math,
                        x_packed: launches.append((layout.format.name, slots.shape[1], math, weights.dtype, x.dtype,
                                                   x_packed is not None)))
    experts._compile_kernels()
    # the weights in the activation's dtype, as the router hands them over: the same specialisation;
    # two classes: no step takes its input packed by the router (input_packing is for one class)
    assert sorted(launches, key=lambda launch: launch[:2]) == [
        ("bf16", k, experts.math, torch.float32, torch.float32, False),
        *[("int4", n, experts.math, torch.float32, torch.float32, False) for n in range(1, k + 1)]]
    assert experts.input_packing(checkpoint.config.moe_layers[0]) is None
    # one class of int4 slots where the router packs (a GPU's, or the interpreter's): its k-wide
    # step compiles on a packed input too
    single = OffloadedExperts(store, OffloadConfig(budget_bytes=8 * store.layout("int4").nbytes, **PRESETS["static-int4"]),
                              k, "cpu", torch.float32)
    model.attach_experts(single)
    single._workspaces = {"int4": object()}
    single._packing = InputPacking(torch.zeros(4, dtype=torch.int32), 4, checkpoint.config.hidden_size)
    launches.clear()
    single._compile_kernels()
    assert launches == [("int4", k, single.math, torch.float32, torch.float32, packed) for packed in (False, True)]
    assert single.input_packing(checkpoint.config.moe_layers[0]) is single._packing
