"""MemoryStore: host-memory blobs with the ExpertStore read interface."""

from __future__ import annotations

import torch

from dymoe.checkpoint.blob import encode_expert, unpack_expert
from dymoe.checkpoint.memory_store import MemoryStore


def random_experts(layers=(0, 2), experts=4, hidden=64, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        l: (torch.randn(experts, 2 * width, hidden, generator=g).to(torch.bfloat16),
            torch.randn(experts, hidden, width, generator=g).to(torch.bfloat16))
        for l in layers
    }


def test_from_experts_round_trip_and_alignment():
    experts = random_experts()
    store = MemoryStore.from_experts(experts, precisions=("bf16", "int4"), group_size=64, pin=False)
    assert store.layers == (0, 2) and store.num_experts == 4 and store.precisions == ("bf16", "int4")
    for layer, (gate_up, down) in experts.items():
        for e in range(4):
            gate, up, d = unpack_expert(store.blob(layer, e, "bf16"), store.layout("bf16"))
            assert torch.equal(torch.cat([gate, up]), gate_up[e]) and torch.equal(d, down[e])
            blob = store.blob(layer, e, "int4")
            expected = encode_expert(gate_up[e, :32], gate_up[e, 32:], down[e], store.layout("int4"))
            assert torch.equal(blob, expected)
            assert blob.data_ptr() % 4096 == store.buffer.data_ptr() % 4096
    assert store.resident_bytes == store.nbytes()


def test_pin_from_respects_budget_and_falls_back():
    source = MemoryStore.from_experts(random_experts(seed=1), precisions=("bf16",), pin=False)
    one = source.layout("bf16").nbytes
    tier = MemoryStore.pin_from(source, budget_bytes=3 * one + one // 2)
    assert tier.resident_bytes == 3 * one
    for layer in source.layers:
        for e in range(source.num_experts):
            assert torch.equal(tier.blob(layer, e, "bf16"), source.blob(layer, e, "bf16"))
    held = [(l, e) for l in source.layers for e in range(4) if tier.blob(l, e, "bf16").data_ptr() >= tier.buffer.data_ptr()
            and tier.blob(l, e, "bf16").data_ptr() < tier.buffer.data_ptr() + tier.resident_bytes]
    assert held == [(0, 0), (0, 1), (0, 2)]
