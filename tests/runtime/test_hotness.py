"""DynaExq as a runtime: hotness, promotion order, never a stall, budget limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.errors import BudgetError
from dymoe.runtime import hotness
from dymoe.runtime.hotness import HotnessController
from dymoe.runtime.presets import RuntimeConfig
from dymoe.runtime.slot_pool import SlotPool

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


def nan_filled_pool(*args):
    """A slot pool whose bytes are all 0xFF (NaN at bf16), as uninitialised memory may be."""
    pool = SlotPool(*args)
    pool.buffer.fill_(255)
    return pool


def test_decode_prepare_uploads_each_class_padded_to_k_slots_with_a_mask(monkeypatch):
    """A hand-made step of the deferred decode (the CUDA-graph segments' path): expert 9's high copy
    has landed, expert 3's is still in flight (its int4 copy serves), 20 and 7 have none. Each class
    gets k slot ids (slot 0 of the class where the expert runs at the other) and a 0/1 mask in one
    row; the compute equals each class run on its own experts; finish unpins and counts the step."""
    monkeypatch.setattr(hotness, "SlotPool", nan_filled_pool)
    runtime = RuntimeConfig(policy="dynaexq", device_memory=ALL_INT4 + 24 * BF16, progress=False)
    experts = Engine.load(EngineConfig(model_dir=DEMO, device="cpu", progress=False, runtime=runtime)).model.experts
    assert experts.deferred_decode
    assert not experts.pool.view("bf16", 0).any()  # the filler slot: zeroed before anything lands
    layer = experts.layers[1]
    row = experts.controller.row[layer]
    experts.controller.hot[row, 9], experts.controller.hot[row, 3] = 1.0, 0.5
    experts._promote(layer)  # only 9 and 3: the rest of the layer is cold
    in_flight = experts._promotions[layer, 3]
    is_done = experts.transfers.is_done
    experts.transfers.is_done = lambda ticket: ticket is not in_flight and is_done(ticket)
    experts.transfers.wait(experts._promotions[layer, 9])
    ids, weights = torch.tensor([9, 20, 3, 7]), torch.tensor([0.4, 0.3, 0.2, 0.1])
    hidden = torch.randn(1, experts.high_layout.hidden_size, generator=torch.Generator().manual_seed(0)).to(experts.dtype)
    experts.decode_prepare(layer, hidden, ids, weights)
    high = experts.cache.peek((layer, 9)).slot
    low = {e: experts.low_cache.peek((layer, e)).slot for e in (20, 3, 7)}
    assert experts._padded_upload.row(0, 16).view(4, 4).tolist() == [
        [high, 0, 0, 0], [1, 0, 0, 0],  # bf16: slots, mask
        [0, low[20], low[3], low[7]], [0, 1, 1, 1],  # int4
    ]
    assert experts.cache.is_pinned((layer, 9)) and experts.low_cache.is_pinned((layer, 3))
    out = experts.decode_compute(layer, hidden, weights)
    expected = (experts._decode(hidden, torch.tensor([high]), weights[:1], "bf16", experts._high_table)
                + experts._decode(hidden, torch.tensor([low[20], low[3], low[7]]), weights[1:], "int4",
                                  experts._low_table))
    torch.testing.assert_close(out, expected)
    experts.decode_finish(layer)
    assert not experts.cache.is_pinned((layer, 9)) and not any(experts.low_cache.is_pinned((layer, e)) for e in low)
    assert experts._steps[layer] == 1 and experts.precision_uses == {"bf16": 1, "int4": 3}
    experts.transfers.wait(in_flight)


@pytest.mark.parametrize("preset", ["lru", "dynaexq"])
def test_a_store_whose_biases_disagree_with_the_model_is_refused(tmp_path, preset):
    """A store converted from a model with expert biases (GPT-OSS) attached to one without: one
    StoreError naming the mismatch, from either runtime, before any expert runs."""
    from dymoe.errors import StoreError
    from dymoe.models.transformer import load_dense
    from dymoe.runtime.presets import preset_provider
    from tests.tiny_models import tiny_store

    plain, _ = tiny_store(tmp_path / "plain", "qwen3_moe", 1, ("bf16",))
    biased_checkpoint, biased = tiny_store(tmp_path / "biased", "gpt_oss", 1, ("bf16", "int4"))
    experts = preset_provider(biased, preset, 4 * biased.nbytes("bf16"),
                              biased_checkpoint.config.num_experts_per_tok, "cpu", torch.float32)
    model = load_dense(plain, 64, "cpu", torch.float32)
    with pytest.raises(StoreError, match="blobs carry expert biases, but qwen3_moe experts have no biases"):
        model.attach_experts(experts)
