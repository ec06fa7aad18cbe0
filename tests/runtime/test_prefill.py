"""The prefill dequantizer: a wave's low-bit experts, in chunks and batches, equal the reference.

Every expert handed out must equal ``unpack_expert`` of its slot whatever the plan's order, chunking
and mix of resident and in-flight experts; copies are waited for before the batch that reads them
(and only then); a slot whose contents changed is never served stale; and the offloading runtime's
prefill is unchanged, bit for bit, when the workspace holds fewer experts than a wave.
"""

from __future__ import annotations

import pytest
import torch

from dymoe.checkpoint.blob import blob_layout, unpack_expert
from dymoe.models.transformer import load_dense
from dymoe.quant.formats import parse_format
from dymoe.quant.kernels.reference import random_pool
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.prefill import PrefillDequantizer, prefill_capacity
from dymoe.runtime.presets import PRESETS
from tests.tiny_models import tiny_store


def _dequantizer(capacity: int, experts: int = 6, waits: list | None = None):
    layout = blob_layout(parse_format("int3", 64), 160, 48)
    pool, table = random_pool(layout, experts, seed=5, spare_bytes=256)
    waits = [] if waits is None else waits
    dequantizer = PrefillDequantizer(pool, lambda s: int(table[s]), layout, capacity, torch.float32, waits.append)
    dequantizer.workspace.gate_up.fill_(float("nan"))
    dequantizer.workspace.down.fill_(float("nan"))
    return dequantizer, pool, table, layout, waits


def _expected(pool, table, layout, slot):
    gate, up, down = unpack_expert(pool[int(table[slot]):int(table[slot]) + layout.nbytes], layout, torch.float32)
    return torch.cat([gate, up]), down


def test_chunks_and_batches_equal_the_reference_and_wait_only_for_their_copies():
    dequantizer, pool, table, layout, waits = _dequantizer(capacity=4)
    plan = [(4, 4, None), (1, 1, "copy-1"), (5, 5, None), (0, 0, "copy-0"), (3, 3, None), (2, 2, None)]
    dequantizer.plan(plan)
    for i, (_, slot, _) in enumerate(plan):
        gate_up, down = dequantizer.weights(slot)
        expected = _expected(pool, table, layout, slot)
        assert torch.equal(gate_up, expected[0]) and torch.equal(down, expected[1]), slot
        if i == 0:
            assert waits == []  # the resident batch does not wait for the copies
        if i == 1:
            assert waits == ["copy-1", "copy-0"]  # the in-flight batch waits for all of its copies
    # chunk 1 (4 experts): a resident and an in-flight batch; chunk 2: one batch
    assert dequantizer.launches == 3 and waits == ["copy-1", "copy-0"]


def test_a_slot_asked_again_is_dequantized_again():
    dequantizer, pool, table, layout, _ = _dequantizer(capacity=3)
    dequantizer.plan([(0, 0, None), (1, 1, None)])
    dequantizer.weights(0)
    pool[int(table[0]):int(table[0]) + layout.nbytes] = pool[int(table[2]):int(table[2]) + layout.nbytes].clone()
    gate_up, _ = dequantizer.weights(0)  # new contents (another layer's expert in the same slot)
    assert torch.equal(gate_up, _expected(pool, table, layout, 2)[0])
    gate_up, _ = dequantizer.weights(1)  # the plan was dropped: still correct
    assert torch.equal(gate_up, _expected(pool, table, layout, 1)[0])


def test_capacity_is_bounded_by_slots_experts_and_bytes():
    layout = blob_layout(parse_format("int4", 128), 2048, 768)  # Qwen3-30B-A3B: 9 MiB per bf16 expert
    assert prefill_capacity(layout, 40, 128, torch.bfloat16) == 40
    assert prefill_capacity(layout, 500, 128, torch.bfloat16) == 113  # 1 GiB
    assert prefill_capacity(layout, 500, 60, torch.bfloat16) == 60
    assert prefill_capacity(layout, 500, 128, torch.bfloat16, max_bytes=1) == 1


@pytest.fixture(scope="module")
def int4_store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("prefill"), "olmoe", 3, ("bf16", "int4"))


@pytest.mark.parametrize("preset", ["static-int4", "dymoe"])
def test_offloaded_prefill_is_unchanged_by_chunking(int4_store, preset):
    checkpoint, store = int4_store
    c = checkpoint.config
    model = load_dense(checkpoint, 64, "cpu", torch.float32)
    prompts = torch.tensor([[1, 17, 42, 5, 63, 8, 29, 11], [2, 90, 33, 7, 7, 51, 64, 3]])
    outputs, launches = [], []
    for capacity in (None, 2):
        experts = OffloadedExperts(store, OffloadConfig(budget_bytes=12 * store.layout("int4").nbytes,
                                                        **PRESETS[preset]), c.num_experts_per_tok, "cpu",
                                   torch.float32)
        if capacity is not None:
            for precision, old in experts._prefill.items():
                experts._prefill[precision] = PrefillDequantizer(old.pool, old.slot_offset, old.layout, capacity,
                                                                 torch.float32, old.wait)
        model.attach_experts(experts)
        outputs.append(model(prompts, 0, model.new_cache(2)))
        launches.append(sum(d.launches for d in experts._prefill.values()))
    assert torch.equal(outputs[0], outputs[1])
    assert launches[1] > launches[0] > 0
