"""MXFP4, the format GPT-OSS publishes its routed experts in, read back to ordinary floats.

MXFP4 (the OCP Microscaling spec) stores weights in blocks of 32 along the input dimension: each
value is a 4-bit float E2M1 (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
their negatives) and each block shares one 8-bit power-of-two scale E8M0 (the byte is the exponent,
biased by 127). The hub checkpoints keep, per expert projection, ``<name>_blocks`` uint8
``[..., G, 16]`` (two codes a byte, the low nibble first) and ``<name>_scales`` uint8 ``[..., G]``,
``G`` blocks per row; a row of ``G * 32`` values is rebuilt as ``code_value * 2**(scale - 127)``.

dymoe does not compute in MXFP4: the checkpoint reader dequantizes experts with :func:`dequantize_mxfp4`
as it reads them (to bf16, which holds every MXFP4 value exactly), and the expert store makes its own
copies from those.
"""

from __future__ import annotations

import torch

# E2M1 code -> value: bit 3 is the sign, bits 2-1 the exponent, bit 0 the mantissa.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values sharing one scale
SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Rows of MXFP4 blocks [..., G, 16] (uint8) with their scales [..., G] (uint8) -> [..., G * 32] in ``dtype``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}: "
                         f"expected blocks [..., G, {BLOCK // 2}] and scales [..., G]")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [..., G, 32], low nibble first
    values = table[codes.long()]
    exponents = scales.to(torch.int32).sub_(SCALE_BIAS).unsqueeze(-1)
    return torch.ldexp(values, exponents).flatten(-2).to(dtype)
