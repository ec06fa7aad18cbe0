"""Fate's precision rule (``fate`` preset): int4 in decode, unpopular experts at int2 in prefill (CPU).

The runtime's decisions are checked on hand-made routing with known token counts; its logits are
checked bit for bit against a reference that dequantizes each expert at the precision the rule
chose, straight from the store; and the pool stays within the budget while both classes are used.
"""

from __future__ import annotations

import random

import pytest
import torch

from dymoe.models.transformer import load_dense
from dymoe.quant.kernels import reference_decode
from dymoe.runtime.expert_compute import dequantized_expert, run_grouped
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.precision import ImportanceRule, PopularityRule
from dymoe.runtime.presets import PRESETS
from tests.tiny_models import tiny_store

PROMPT = torch.tensor([[1, 17, 42, 5, 63, 8, 29, 11, 2, 90, 33, 7, 7, 51, 64, 3]])

# 8 tokens, top-2 over 8 experts: a balanced router gives each expert 8 * 2 / 8 = 2 tokens
HAND_IDS = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1], [0, 2], [0, 2], [4, 3], [4, 5]])
HAND_COUNTS = {0: 6, 1: 4, 2: 2, 3: 1, 4: 2, 5: 1}


@pytest.mark.parametrize("floor,high", [(1.0, {0, 1, 2, 4}), (1.5, {0, 1}), (0.5, {0, 1, 2, 3, 4, 5}),
                                        (4.0, set())])
def test_popularity_rule_prefill(floor, high):
    experts, counts = zip(*sorted(HAND_COUNTS.items()))
    rule = PopularityRule(num_experts=8, floor=floor)
    assert rule.prefill_high(HAND_IDS, torch.full((8, 2), 0.5), list(experts), list(counts)) == high
    assert rule.decode_high(torch.tensor([0.7, 0.3])) is None  # one token: every expert high
    assert not rule.prefetch_low and ImportanceRule(0.5).prefetch_low


@pytest.fixture(scope="module")
def model_and_store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("fate"), "qwen3_moe", 5, ("int4", "int2"), num_hidden_layers=4)


class RecordingStore:
    """The store, recording the precision and size of every blob the runtime copies."""

    def __init__(self, store):
        self.store, self.fetched = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def blob(self, layer, expert, precision):
        blob = self.store.blob(layer, expert, precision)
        self.fetched.append((layer, expert, precision, blob.numel()))
        return blob


def min_budget(checkpoint, store) -> int:
    """The smallest budget the fate preset accepts: each class holds one token's top-k."""
    k, share = checkpoint.config.num_experts_per_tok, PRESETS["fate"]["high_share"]
    return int(max(k * store.layout("int4").nbytes / share, k * store.layout("int2").nbytes / (1 - share))) + 1


def fate(checkpoint, store, budget):
    recording = RecordingStore(store)
    config = OffloadConfig(budget_bytes=budget, **PRESETS["fate"])
    return OffloadedExperts(recording, config, checkpoint.config.num_experts_per_tok, "cpu", torch.float32), recording


def test_prefill_runs_unpopular_experts_at_int2(model_and_store):
    checkpoint, store = model_and_store
    c = checkpoint.config
    assert (c.num_experts, c.num_experts_per_tok) == (8, 3)
    ids = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 1, 2], [0, 4, 5], [0, 1, 6], [0, 1, 2], [0, 1, 7], [0, 1, 2]])
    # 8 tokens x 3 / 8 experts = 3 tokens each if balanced; popular = at least half of that (floor 0.5):
    # 0 (8 tokens), 1 (7), 2 (4); 3..7 have one each
    experts, recording = fate(checkpoint, store, 32 * store.layout("int4").nbytes)  # int2 class: >= 8 slots
    layer = c.moe_layers[1]
    experts.run_experts(layer, torch.randn(8, c.hidden_size), ids, torch.full((8, 3), 1 / 3))
    chosen = {e: experts.cache.peek((layer, e)).precision for e in range(8)}
    assert chosen == {0: "int4", 1: "int4", 2: "int4", 3: "int2", 4: "int2", 5: "int2", 6: "int2", 7: "int2"}
    assert sorted((e, p) for _, e, p, _ in recording.fetched) == sorted(chosen.items())  # one copy each
    assert experts.stats()["precision_uses"] == {"int4": 3, "int2": 5}


def test_decode_runs_int4_only_and_refetches_int2_copies(model_and_store):
    checkpoint, store = model_and_store
    c = checkpoint.config
    experts, recording = fate(checkpoint, store, 16 * store.layout("int4").nbytes)
    layer = c.moe_layers[0]
    ids = torch.tensor([[3, 4, 5]])
    for e in (3, 4):  # int2 copies left by a prefill
        slot = experts.cache.make_room("int2")
        experts.cache.insert((layer, e), "int2", slot)
        experts.pool.view("int2", slot).copy_(store.blob(layer, e, "int2"))
    experts.run_experts(layer, torch.randn(1, c.hidden_size), ids, torch.tensor([[0.5, 0.3, 0.2]]))
    assert [p for _, _, p, _ in recording.fetched] == ["int4"] * 3  # the two int2 copies are not used
    assert experts.stats()["precision_uses"] == {"int4": 3, "int2": 0}
    assert {experts.cache.peek((layer, e)).precision for e in (3, 4, 5)} == {"int4"}


class ChosenPrecisionReference:
    """The reference the fate preset must equal: each expert dequantized straight from the store at the
    precision Fate's rule gives it (int2 below ``floor`` x the balanced share in prefill, else int4;
    int4 in decode)."""

    def __init__(self, store, num_experts: int, floor: float):
        self.store, self.num_experts, self.floor = store, num_experts, floor
        self.used: dict[str, int] = {"int4": 0, "int2": 0}

    def run_experts(self, layer, hidden, expert_ids, expert_weights):
        if hidden.shape[0] == 1:  # the runtime's decode: the fused step's torch definition, one expert at a time
            blobs = [self.store.blob(layer, e, "int4") for e in expert_ids[0].tolist()]
            offsets = torch.tensor([0, *torch.tensor([b.numel() for b in blobs]).cumsum(0)[:-1].tolist()])
            self.used["int4"] += len(blobs)
            return reference_decode(torch.cat(blobs), offsets, self.store.layout("int4"), hidden, expert_weights)
        n, k = expert_ids.shape
        counts = torch.bincount(expert_ids.reshape(-1), minlength=self.num_experts).tolist()

        def weights_of(e):
            precision = "int4" if counts[e] >= self.floor * n * k / self.num_experts else "int2"
            self.used[precision] += 1
            return dequantized_expert(self.store.blob(layer, e, precision), self.store.layout(precision),
                                      hidden.dtype)

        return run_grouped(hidden, expert_ids, expert_weights, weights_of)


def generate(model, experts, steps=8, after_prefill=lambda: None):
    """Prefill PROMPT, then greedy decode: (prefill logits [T, V], decode logits [steps, V])."""
    model.attach_experts(experts)
    cache = model.new_cache(1)
    prefill = model(PROMPT, 0, cache)[0]
    after_prefill()
    logits, trail = prefill[-1], []
    for i in range(steps):
        trail.append(logits)
        logits = model(logits.argmax().view(1, 1), PROMPT.shape[1] + i, cache, last_only=True)[0]
    return prefill, torch.stack(trail)


def test_fate_equals_the_chosen_precisions_within_budget(model_and_store):
    checkpoint, store = model_and_store
    c = checkpoint.config
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    reference = ChosenPrecisionReference(store, c.num_experts, PRESETS["fate"]["popularity_floor"])
    expected = generate(model, reference)
    assert reference.used["int2"] > 0 and reference.used["int4"] > 0  # the prompt has unpopular experts
    low = min_budget(checkpoint, store)
    everything = len(c.moe_layers) * c.num_experts * (store.layout("int4").nbytes + store.layout("int2").nbytes)
    rng = random.Random(7)
    for budget in [low, everything] + [rng.randint(low, everything) for _ in range(3)]:
        experts, recording = fate(checkpoint, store, budget)
        prefill_fetches = []
        prefill, decode = generate(model, experts, after_prefill=lambda: prefill_fetches.append(len(recording.fetched)))
        assert torch.equal(prefill, expected[0]), budget
        assert torch.equal(decode, expected[1]), budget
        assert experts.pool.capacity_bytes <= budget
        stats = experts.stats()
        assert stats["total"]["h2d_bytes"] == sum(n for *_, n in recording.fetched)
        assert stats["precision_uses"]["int2"] > 0
        decode_fetches = {p for _, _, p, _ in recording.fetched[prefill_fetches[0]:]}
        assert decode_fetches <= {"int4"}, budget  # decode and its prefetch move int4 copies only
