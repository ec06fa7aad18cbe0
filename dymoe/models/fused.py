"""Fused Triton kernels for the dense parts of a layer (CUDA only; the torch code in
:mod:`dymoe.models.layers` is the reference and the CPU path).

A decode step of one token is a chain of small kernels, and inside a CUDA graph each costs a few
microseconds whatever its size: the plain RMSNorm is eight (cast, square, mean, add, rsqrt,
multiply, cast, weight), and a Qwen3 layer runs four of them (block, q per head, k per head,
post-attention). :func:`rms_norm` is one kernel with the same roundings: normalise in float32,
round to the input dtype, then multiply by the weight in float32 and round to the promoted dtype
(as ``weight * x.to(dtype)`` does). Only the order of the float32 sum of squares differs, so an
output may differ from the torch one by one unit in the last place, rarely. :func:`rotary` is the
rotary embedding of q or k in one kernel instead of five (with the decode position read from the
device), rounding its two products and their sum as the torch code does.

``DYMOE_FUSED_DENSE=0`` turns the kernels off (for comparison, or if one misbehaves); a bad value
is one clear error.
"""

import functools
import os

import torch

from dymoe.env import env_choice
from dymoe.quant.kernels import triton_available


def _setting() -> bool:
    return env_choice("DYMOE_FUSED_DENSE", {"1": "fused dense kernels on CUDA, the default", "0": "off"}, "1") == "1"


ENABLED = _setting()


def fused_applies(x: torch.Tensor) -> bool:
    """Whether the fused kernels run for ``x``: on by default for CUDA tensors when Triton is
    installed (the ``gpu`` extra), or for any tensor under ``TRITON_INTERPRET=1`` (the tests)."""
    if not ENABLED or not triton_available():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton

    from dymoe.models.fused_kernels import rms_norm_kernel, rotary_kernel

    return triton, rms_norm_kernel, rotary_kernel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dimension, one launch."""
    triton, kernel, _ = _kernels()
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, x), device=x.device)
    block = triton.next_power_of_2(n)
    kernel[(rows.shape[0],)](rows, weight, out, eps, N=n, BLOCK=block, num_warps=4 if block <= 4096 else 8)
    return out.view(*x.shape[:-1], n)


def rotary_applies(x: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether :func:`rotary` takes ``x`` [B, heads, T, D]: :func:`fused_applies`, unit stride
    over D, an even D and a table as wide (else the torch code runs)."""
    return (fused_applies(x) and x.stride(-1) == 1 and x.shape[-1] % 2 == 0 and table.is_contiguous()
            and table.shape[-1] == x.shape[-1])


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0,
           positions: torch.Tensor | None = None) -> torch.Tensor:
    """``x * cos[p] + rotate_half(x) * sin[p]`` for ``x`` [B, heads, T, D] at positions
    ``p = start + t``, or ``positions[t]`` read on the device (a decode step in a CUDA graph);
    ``cos``/``sin`` are whole [positions, D] tables."""
    triton, _, kernel = _kernels()
    b, h, t, d = x.shape
    out = torch.empty_like(x, dtype=torch.result_type(x, cos))
    kernel[(b * h * t,)](x, out, cos, sin, positions if positions is not None else cos, start, h, t, x.stride(0),
                         x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), D=d,
                         BLOCK=triton.next_power_of_2(d), FROM_DEVICE=positions is not None, num_warps=1)
    return out
