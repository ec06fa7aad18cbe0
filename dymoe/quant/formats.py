"""The precisions an expert can be stored in, and exactly how many bytes each takes.

Formats (weights are ``[out, in]`` as in a Hugging Face ``nn.Linear``; groups run along ``in``):

====  ====  ===========================  ==================================================================
name  bits  quantization                 parts
====  ====  ===========================  ==================================================================
bf16  16    none (raw bfloat16)          ``weight`` bf16 ``[out, in]``
int8  8     symmetric, scale per row     ``weight`` int8 ``[out, in]``, ``scales`` fp16 ``[out]``
int4  4     asymmetric, scale+min/group  ``weight`` uint8 ``[out, G*g/2]``, ``scales``/``mins`` fp16 ``[out, G]``
int3  3     asymmetric, scale+min/group  ``weight`` uint8 ``[out, G*g*3/8]``, ``scales``/``mins`` fp16 ``[out, G]``
int2  2     asymmetric, scale+min/group  ``weight`` uint8 ``[out, G*g/4]``, ``scales``/``mins`` fp16 ``[out, G]``
====  ====  ===========================  ==================================================================

``g`` is the group size (64 or 128) and ``G = ceil(in / g)``. An ``in`` that is not a multiple of
``g`` is padded up to ``G*g`` columns (GPT-OSS has ``in = 2880``, 22.5 groups of 128); the padded
columns hold codes that a kernel must multiply by zero activations (or mask). Dequantization is
``w = code * scale + min`` for the group formats and ``w = code * scale`` for int8.

Scales and mins are stored as **fp16**, not bf16: fp16's 11-bit significand keeps their rounding
error 8x smaller, and weight magnitudes are nowhere near fp16's range limits. A min (rather than an
integer zero-point) is stored so that its rounding error is relative to the weights themselves and
not amplified by ``1/scale``. See :mod:`dymoe.quant.reference` for the packing layout and error bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dymoe.errors import InputError

GROUP_SIZES = (64, 128)
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class QuantFormat:
    """One storage precision: ``bits`` per weight, ``group_size`` (0 = per row or none), ``symmetric``."""

    name: str
    bits: int
    group_size: int = 0
    symmetric: bool = False

    @property
    def is_grouped(self) -> bool:
        return self.group_size > 0

    @property
    def is_raw(self) -> bool:
        return self.bits == 16

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1


@dataclass(frozen=True)
class PartSpec:
    """Shape and dtype of one stored tensor of a quantized weight (``weight``, ``scales``, ``mins``)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


GROUPED_BITS = {"int4": 4, "int3": 3, "int2": 2}
PRECISIONS = ("bf16", "int8", *GROUPED_BITS)


def parse_format(name: str, group_size: int = 128) -> QuantFormat:
    """The format called ``name`` (one of :data:`PRECISIONS`); ``group_size`` applies to int4/int3/int2.

    Raises :class:`InputError` naming the accepted values, since both arguments come from flags.
    """
    key = name.strip().lower()
    if key == "bf16":
        return QuantFormat("bf16", 16)
    if key == "int8":
        return QuantFormat("int8", 8, 0, symmetric=True)
    if key not in GROUPED_BITS:
        raise InputError(f"unknown precision {name!r}: choose from {', '.join(PRECISIONS)}")
    if group_size not in GROUP_SIZES:
        raise InputError(f"group size {group_size} is not supported: use 64 or 128 (--group-size)")
    return QuantFormat(key, GROUPED_BITS[key], group_size, symmetric=False)


def num_groups(fmt: QuantFormat, in_features: int) -> int:
    """Groups per row; the last one is padded when ``in_features`` is not a multiple of the group size."""
    return -(-in_features // fmt.group_size)


def packed_row_bytes(bits: int, n: int) -> int:
    """Bytes of ``n`` codes of ``bits`` bits packed by :func:`dymoe.quant.reference.pack_bits`
    (``n`` rounds up to whole packing words: 2 codes for int4, 4 for int2, 8 for int3)."""
    per_word = 8 // math.gcd(bits, 8)
    return -(-n // per_word) * per_word * bits // 8


def part_specs(fmt: QuantFormat, out_features: int, in_features: int) -> tuple[PartSpec, ...]:
    """The tensors that store one ``[out, in]`` weight in ``fmt``, in storage order."""
    if fmt.is_raw:
        return (PartSpec("weight", (out_features, in_features), torch.bfloat16),)
    if not fmt.is_grouped:
        return (PartSpec("weight", (out_features, in_features), torch.int8),
                PartSpec("scales", (out_features,), SCALE_DTYPE))
    groups = num_groups(fmt, in_features)
    row = packed_row_bytes(fmt.bits, groups * fmt.group_size)
    return (PartSpec("weight", (out_features, row), torch.uint8),
            PartSpec("scales", (out_features, groups), SCALE_DTYPE),
            PartSpec("mins", (out_features, groups), SCALE_DTYPE))


def nbytes(fmt: QuantFormat, out_features: int, in_features: int) -> int:
    """Exact bytes of one ``[out, in]`` weight in ``fmt`` (payload, scales and mins, unaligned)."""
    return sum(p.nbytes for p in part_specs(fmt, out_features, in_features))
