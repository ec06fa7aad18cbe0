"""DynaExq as a runtime: hotness, promotion order, never a stall, budget limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.errors import BudgetError
from dymoe.runtime.hotness import HotnessController
from dymoe.runtime.presets import RuntimeConfig

DEMO = Path(__file__).resolve().parents[2] / "models" / "dymoe-demo-moe"
ALL_INT4 = 6 * 32 * 36864  # every demo expert at int4 (36 KiB blobs)
BF16 = 98304


def test_hotness_is_an_exponential_moving_average():
    c = HotnessController([0, 1], 4, decay=0.5)
    c.observe(0, [1, 2])
    c.observe(0, [2])
    assert c.hot[0].tolist() == [0.0, 0.25, 0.75, 0.0]
    assert c.hottest(0, 2) == [2, 1]
    assert c.value((1, 3)) == 0.0


def run(budget, n=24):
    runtime = RuntimeConfig(policy="dynaexq", device_memory=budget, progress=False)
    engine = Engine.load(EngineConfig(model_dir=DEMO, device="cpu", progress=False, runtime=runtime))
    ids = list(engine.generate([5, 17, 33, 2, 90, 11, 64], SamplingParams(max_new_tokens=n)))
    return engine, ids


def test_dynaexq_promotes_hot_experts_within_the_budget():
    budget = ALL_INT4 + 24 * BF16
    engine, ids = run(budget)
    experts = engine.model.experts
    stats = experts.stats()
    assert experts.pool.capacity_bytes <= budget
    assert stats["precision_uses"]["bf16"] > 0 and stats["precision_uses"]["int4"] > 0
    assert stats["total"]["prefetches"] > 0  # promotions happened
    high = experts.cache.resident("bf16")
    assert 0 < len(high) <= 24
    for layer in experts.layers:  # the promoted experts of a layer are among its hottest
        promoted = [e for l, e in high if l == layer]
        hottest = experts.controller.hottest(layer, experts.high_per_layer + 4)
        assert all(e in hottest for e in promoted)
    resident_engine = Engine.load(EngineConfig(model_dir=DEMO, device="cpu", progress=False,
                                               runtime=RuntimeConfig(policy="resident")))
    reference = list(resident_engine.generate([5, 17, 33, 2, 90, 11, 64], SamplingParams(max_new_tokens=24)))
    agree = sum(a == b for a, b in zip(ids, reference)) / len(reference)
    assert agree > 0.5  # int4 + hot bf16 stays close to the exact model on the trained demo


def test_dynaexq_falls_back_to_offloading_int4_when_not_every_copy_fits(capsys):
    """DESIGN.md: where the low-bit copies of all experts do not fit, the preset says so and offloads
    that tier too, rather than failing."""
    engine, ids = run(ALL_INT4)
    experts = engine.model.experts
    message = capsys.readouterr().err
    assert "181 of 192 int4 copies (94%) fit" in message and "offloaded too" in message
    assert experts.fallback and experts.pool.capacity_bytes <= ALL_INT4
    assert experts.pool.counts == {"bf16": 4, "int4": 181}
    stats = experts.stats()["total"]
    assert stats["missed_bytes"] > 0 and stats["prefetches"] > 0  # int4 fetched on demand; promotions go on
    assert len(ids) == 24


def test_dynaexq_refuses_a_budget_below_one_tokens_int4_experts():
    with pytest.raises(BudgetError, match="cannot hold one token's 4 experts at int4.*at least 0.15 MiB"):
        run(4 * 36864 - 1)
