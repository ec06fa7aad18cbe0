"""The fused dense kernels (dymoe/models/fused.py) against the torch code they replace.

Under Triton's interpreter, in float32 and bit for bit in bf16 (the kernels round to bf16 by bit
arithmetic, as a GPU must not fold it away; the GPU side is benchmarks/check_dense_kernels.py); on
a CPU without the interpreter the torch code runs, which every other test covers.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import dymoe.models.fused as fused
from dymoe.errors import InputError
from dymoe.models.config import RopeConfig
from dymoe.models.layers import RMSNorm, RotaryEmbedding, StaticPosition

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (gpu extra)")


def _both(monkeypatch, fn):
    """fn() with the fused kernels off, then on (under the interpreter)."""
    monkeypatch.setattr(fused, "ENABLED", False)
    ref = fn()
    monkeypatch.setattr(fused, "ENABLED", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return ref, fn()


@needs_triton
@pytest.mark.parametrize("n, shape, weight_dtype", [(256, (1, 3), torch.float32), (128, (1, 2, 32), torch.float32),
                                                     (96, (5,), torch.float32), (100, (2,), torch.bfloat16)])
def test_rms_norm_kernel_matches_the_module(monkeypatch, n, shape, weight_dtype):
    """Rows of a power of two and not (a masked tail), per-head norms ([B, T, heads, D]) and a
    weight of another dtype (the result takes the promoted dtype, as in torch)."""
    torch.manual_seed(0)
    norm = RMSNorm(n, 1e-6)
    norm.weight.data = torch.randn(n).to(weight_dtype)
    x = torch.randn(*shape, n) * 3
    x[..., 0] = 400.0  # one large value: the sum of squares is not dominated by rounding
    ref, got = _both(monkeypatch, lambda: norm(x))
    assert got.shape == ref.shape and got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-6)
    assert not torch.equal(got, torch.zeros_like(got))


@needs_triton
def test_rotary_kernel_matches_the_module(monkeypatch):
    """q and k as the attention hands them over ([B, heads, T, D] views of [B, T, heads, D]), at
    an integer start (prefill, several tokens) and at a position read from the device (decode)."""
    torch.manual_seed(0)
    rotary = RotaryEmbedding(RopeConfig(theta=1e6), 64, 32)
    rotary.build("cpu", torch.float32)
    q = torch.randn(2, 5, 6, 64).transpose(1, 2)
    k = torch.randn(2, 5, 2, 64).transpose(1, 2)
    for start, qq, kk in ((7, q, k), (StaticPosition(torch.tensor([19]), 32, None), q[:, :, :1], k[:, :, :1])):
        (rq, rk), (gq, gk) = _both(monkeypatch, lambda: rotary(qq, kk, start))
        for ref, got in ((rq, gq), (rk, gk)):
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(gq, qq)  # (a rotation that did nothing would pass at position 0)


def test_fused_kernels_only_where_they_apply(monkeypatch):
    """Off on a CPU tensor without the interpreter (the torch code runs: CI's path) and when
    DYMOE_FUSED_DENSE=0; a bad value is one clear error."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused, "ENABLED", True)
    assert not fused.fused_applies(torch.zeros(4))
    for value, expected in (("", True), ("1", True), ("0", False)):
        monkeypatch.setenv("DYMOE_FUSED_DENSE", value)
        assert fused._setting() is expected
    monkeypatch.setenv("DYMOE_FUSED_DENSE", "off")
    with pytest.raises(InputError, match="DYMOE_FUSED_DENSE='off': use 1"):
        fused._setting()


@needs_triton
def test_bf16_outputs_equal_the_torch_ones_bit_for_bit(monkeypatch):
    """In bf16 the two products and the sum of the rotary embedding, and the normalised value and
    the weighted one of RMSNorm, round as the torch ops round (round to nearest even): the rotary
    outputs are identical, the norms identical but for the float32 sum's order (at most one unit
    in the last place, in a few values)."""
    torch.manual_seed(1)
    rotary = RotaryEmbedding(RopeConfig(theta=1e6), 128, 64)
    rotary.build("cpu", torch.bfloat16)
    q = torch.randn(1, 5, 8, 128).bfloat16().transpose(1, 2)
    k = torch.randn(1, 5, 2, 128).bfloat16().transpose(1, 2)
    (rq, rk), (gq, gk) = _both(monkeypatch, lambda: rotary(q, k, 11))
    assert torch.equal(gq, rq) and torch.equal(gk, rk)
    norm = RMSNorm(2048, 1e-6).bfloat16()
    norm.weight.data = torch.randn(2048).bfloat16()
    x = (torch.randn(4, 2048) * 3).bfloat16()
    ref, got = _both(monkeypatch, lambda: norm(x))
    assert got.dtype == torch.bfloat16
    ulps = (got.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert int(ulps.max()) <= 1 and float((ulps == 0).float().mean()) > 0.99
