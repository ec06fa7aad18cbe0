"""DyMoE's mixed precision in the offloading runtime: importance, depth floors, substitution."""

from __future__ import annotations

import pytest
import torch

from dymoe.checkpoint.convert import convert_store
from dymoe.checkpoint.reader import Checkpoint
from dymoe.checkpoint.store import ExpertStore
from dymoe.errors import BudgetError
from dymoe.models.transformer import load_dense
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.precision import important_count
from dymoe.runtime.presets import PRESETS
from dymoe.runtime.resident import ResidentExperts
from tests.tiny_models import make_hf_model, save_checkpoint


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
    root = tmp_path_factory.mktemp("mixed")
    path = save_checkpoint(make_hf_model("qwen3_moe", seed=21, num_hidden_layers=4).to(torch.bfloat16), root / "m")
    checkpoint = Checkpoint.open(path)
    store = ExpertStore.open(convert_store(checkpoint, root / "store", precisions=("bf16", "int4"), group_size=64,
                                           progress=False))
    return checkpoint, store


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
