"""Invariant 4 for the reference formats: exact packing, documented error bounds, exact sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dymoe.errors import InputError
from dymoe.quant.formats import PRECISIONS, nbytes, parse_format, part_specs
from dymoe.quant.reference import dequantize, error_bound, pack_bits, quantize, unpack_bits, unpack_float

LOW_BIT = ("int4", "int3", "int2")


def normal(out: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed)) * 0.02


def heavy_tailed(out: int, n: int, seed: int = 0) -> torch.Tensor:
    """Student-t (3 degrees of freedom) plus a few large outliers, like real LLM weight rows."""
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((out, n)) * 0.02
    idx = torch.randint(0, w.numel(), (max(1, w.numel() // 500),))
    w.view(-1)[idx] *= 20
    return w


# ---- packing -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 4), n=st.integers(0, 70), seed=st.integers(0, 99))
def test_pack_round_trips_exactly(bits, rows, n, seed):
    values = torch.randint(0, 1 << bits, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits, n), values)
    # the float codes dequantize reads (int4 and int2 through a table of each byte's codes)
    unpacked = unpack_float(packed, bits, n)
    assert unpacked.dtype == torch.float32 and torch.equal(unpacked, values.float())


def test_int3_layout_is_a_little_endian_24_bit_word():
    codes = torch.arange(8, dtype=torch.uint8)[None]
    b = pack_bits(codes, 3)[0].tolist()
    word = b[0] | b[1] << 8 | b[2] << 16
    assert [(word >> 3 * i) & 7 for i in range(8)] == list(range(8))


def test_int4_and_int2_layouts_fill_bytes_from_the_low_bits():
    assert pack_bits(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack_bits(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(torch.tensor([[4]], dtype=torch.uint8), 2)


# ---- error bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [normal, heavy_tailed], ids=["normal", "heavy_tailed"])
@pytest.mark.parametrize("name", ["int8", *LOW_BIT])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("rounding", ["nearest", "hqq"])
def test_round_trip_within_documented_bound(make, name, group_size, rounding):
    w = make(48, 320)
    q = quantize(w, parse_format(name, group_size), rounding)
    err = (w - dequantize(q, torch.float32)).abs()
    bound = error_bound(q)
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def test_round_to_nearest_bound_is_half_a_step():
    """The headline bound: for ordinary weights, error <= scale/2 per group (the fp16 terms are tiny)."""
    w = normal(32, 256)
    q = quantize(w, parse_format("int4", 64))
    err = (w - dequantize(q, torch.float32)).abs().reshape(32, 4, 64).amax(dim=-1)
    assert bool((err <= q.scales.float() / 2 * (1 + 1e-3)).all())


def test_int8_is_symmetric_per_row():
    w = heavy_tailed(16, 100)
    q = quantize(w, parse_format("int8"))
    assert q.scales.shape == (16,) and q.mins is None
    codes = q.payload
    assert int(codes.abs().amax(dim=1).min()) == 127  # each row's extreme uses the full range
    assert bool(((w - dequantize(q, torch.float32)).abs() <= q.scales.float()[:, None] / 2 * (1 + 1e-4)).all())


def test_bf16_is_exact_for_bf16_weights():
    w = normal(8, 24).bfloat16()
    assert torch.equal(dequantize(quantize(w, parse_format("bf16"))), w)


@pytest.mark.parametrize("name", LOW_BIT)
def test_hqq_reduces_error_on_heavy_tailed_weights(name):
    w = heavy_tailed(128, 1024, seed=3)
    fmt = parse_format(name, 128)
    rms = {r: (w - dequantize(quantize(w, fmt, r), torch.float32)).pow(2).mean().sqrt() for r in ("nearest", "hqq")}
    assert rms["hqq"] < rms["nearest"] * 0.99, rms


def test_constant_and_zero_groups_do_not_divide_by_zero():
    w = torch.cat([torch.zeros(2, 64), torch.full((2, 64), 0.5)], dim=1)
    for name in ("int8", *LOW_BIT):
        q = quantize(w, parse_format(name, 64))
        assert bool(((w - dequantize(q, torch.float32)).abs() <= error_bound(q)).all())


# ---- shapes and sizes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("n", [64, 96, 2880, 33])
def test_nbytes_is_exact_and_padding_is_transparent(name, n):
    """An in-features that is not a multiple of the group size is padded, not refused."""
    fmt = parse_format(name, 64)
    w = normal(5, n)
    q = quantize(w, fmt)
    tensors = [t for t in (q.payload, q.scales, q.mins) if t is not None]
    assert sum(t.numel() * t.element_size() for t in tensors) == nbytes(fmt, 5, n)
    assert [tuple(t.shape) for t in tensors] == [p.shape for p in part_specs(fmt, 5, n)]
    assert dequantize(q, torch.float32).shape == (5, n)


def test_sizes_of_a_real_expert_projection():
    # Qwen3-30B-A3B gate_proj: [768, 2048]
    assert nbytes(parse_format("bf16"), 768, 2048) == 768 * 2048 * 2
    assert nbytes(parse_format("int4", 128), 768, 2048) == 768 * 1024 + 2 * 768 * 16 * 2
    assert nbytes(parse_format("int3", 64), 768, 2048) == 768 * 768 + 2 * 768 * 32 * 2
    assert nbytes(parse_format("int8"), 768, 2048) == 768 * 2048 + 768 * 2


def test_bad_format_names_and_group_sizes_are_user_errors():
    with pytest.raises(InputError, match="unknown precision 'int5'"):
        parse_format("int5")
    with pytest.raises(InputError, match="group size 100 .*--group-size"):
        parse_format("int4", group_size=100)
    assert parse_format("INT4", 64).group_size == 64


# ---- GPT-OSS widths: 2880 = 22.5 groups of 128, 45 of 64 ------------------------------------------


@pytest.mark.parametrize("precision,group_size", [("int8", 128), ("int4", 128), ("int4", 64), ("int3", 128),
                                                  ("int2", 128), ("int2", 64), ("bf16", 128)])
@pytest.mark.parametrize("hidden,width", [(2880, 96), (96, 2880)], ids=["hidden-2880", "width-2880"])
def test_gpt_oss_widths_through_blobs_slots_and_kernels(precision, group_size, hidden, width):
    """An in-dimension of 2880 (GPT-OSS's hidden and expert width) is padded to whole groups: every
    format round-trips a biased expert within its bound through a blob in a slot of the pool, the
    kernel plan accepts the layout, and the prefill dequantize (biases copied out) equals the reference."""
    from dymoe.checkpoint.blob import PART_ALIGN, blob_layout, encode_expert, expert_biases, unpack_expert
    from dymoe.quant.kernels import DequantWorkspace, dequantize_experts, kernel_plan
    from dymoe.runtime.slot_pool import SlotPool

    layout = blob_layout(parse_format(precision, group_size), hidden, width, bias=True)
    plan = kernel_plan(layout)
    assert (plan.gate.cols, plan.down.cols) == (hidden, width)
    assert plan.gate.padded_cols >= hidden and plan.down.padded_cols >= width
    weights = (normal(width, hidden, 1), normal(width, hidden, 2), normal(hidden, width, 3))
    biases = (normal(1, 2 * width, 4)[0], normal(1, hidden, 5)[0])
    pool = SlotPool("cpu", {precision: layout.nbytes}, {precision: 3})
    for slot in range(3):
        assert pool.offset(precision, slot) % PART_ALIGN == 0
        pool.view(precision, slot).copy_(encode_expert(*weights, layout, bias=biases))
    blob = pool.view(precision, 2)
    for w, back in zip(weights, unpack_expert(blob, layout, torch.float32)):
        q = quantize(w, layout.format)
        source = w.bfloat16().float() if layout.format.is_raw else w  # bf16's bound is about bf16 weights
        assert back.shape == w.shape and bool(((source - back).abs() <= error_bound(q)).all())
    for b, stored in zip(biases, expert_biases(blob, layout)):
        assert torch.equal(stored, b.to(torch.bfloat16))
    workspace = DequantWorkspace.allocate(layout, 2, "cpu", torch.float32)
    offsets = torch.tensor([pool.offset(precision, 2), pool.offset(precision, 0)])
    dequantize_experts(pool.buffer, offsets, layout, *workspace.views(0, 2), backend="torch",
                       biases=workspace.bias_views(0, 2))
    gate, up, down = unpack_expert(blob, layout, torch.float32)
    assert torch.equal(workspace.gate_up[1], torch.cat([gate, up])) and torch.equal(workspace.down[0], down)
    assert torch.equal(workspace.gate_up_bias[1], biases[0].to(torch.bfloat16).float())
    assert torch.equal(workspace.down_bias[0], biases[1].to(torch.bfloat16).float())
