"""What a kernel needs to know about one blob layout, as plain integers (Triton constexprs).

A :class:`~dymoe.checkpoint.blob.BlobLayout` names every part of an expert's blob by byte offset.
The kernels read those parts in place from a slot of the pool buffer through *typed views* of that
one buffer (the payload as int32 words, bytes or bf16; scales and mins as fp16), so every offset
here is in elements of the view it indexes. Slots and parts are 256-byte aligned (see
:mod:`dymoe.runtime.slot_pool` and :mod:`dymoe.checkpoint.blob`), so the divisions are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dymoe.checkpoint.blob import BlobLayout
from dymoe.quant.formats import num_groups, packed_row_bytes

# Payload view per storage width: int8, int4 and int2 rows are read as 32-bit words (4, 8 or 16 codes
# each), int3 rows as bytes (one 24-bit word of 8 codes is assembled from 3 of them; the packed split-K
# path reads them as 32-bit words instead, see triton_experts._split_launch), bf16 as is.
PAYLOAD_DTYPE = {16: torch.bfloat16, 8: torch.int32, 4: torch.int32, 3: torch.uint8, 2: torch.int32}


@dataclass(frozen=True)
class Projection:
    """One weight ``[rows, cols]`` of the blob: where its payload, scales and mins start."""

    rows: int
    cols: int  # true input features (activations beyond it are zero)
    padded_cols: int  # codes per stored row (cols rounded up to whole groups)
    row_elems: int  # payload elements (of the payload view) per stored row
    weight: int  # payload offset, in payload-view elements from the blob's start
    scales: int  # fp16 elements from the blob's start (0 for bf16)
    mins: int  # fp16 elements (0 for bf16 and int8)


@dataclass(frozen=True)
class KernelPlan:
    """The integers of one blob layout that the fused expert kernels are specialised on."""

    bits: int
    group_size: int  # 0 for bf16 and int8
    hidden_size: int
    intermediate_size: int
    gate: Projection
    up: Projection
    down: Projection
    gate_up_bias: int = -1  # bf16 biases (GPT-OSS), in fp16-view elements from the blob's start; -1: none
    down_bias: int = -1

    @property
    def payload_dtype(self) -> torch.dtype:
        return PAYLOAD_DTYPE[self.bits]

    @property
    def payload_elem_bytes(self) -> int:
        return torch.empty((), dtype=self.payload_dtype).element_size()


def kernel_plan(layout: BlobLayout) -> KernelPlan:
    """The :class:`KernelPlan` of ``layout`` (raises ValueError for a layout a kernel cannot read)."""
    fmt = layout.format
    elem = torch.empty((), dtype=PAYLOAD_DTYPE[fmt.bits]).element_size()

    def projection(name: str, rows: int, cols: int) -> Projection:
        weight = layout.part(f"{name}.weight")
        padded = num_groups(fmt, cols) * fmt.group_size if fmt.is_grouped else cols
        row_bytes = packed_row_bytes(fmt.bits, padded) if fmt.is_grouped else cols * fmt.bits // 8
        if row_bytes % elem or weight.offset % elem:
            raise ValueError(f"{fmt.name} rows of {cols} features are not whole {elem}-byte words")
        scales = layout.part(f"{name}.scales").offset // 2 if not fmt.is_raw else 0
        mins = layout.part(f"{name}.mins").offset // 2 if fmt.is_grouped else 0
        return Projection(rows, cols, padded, row_bytes // elem, weight.offset // elem, scales, mins)

    h, i = layout.hidden_size, layout.intermediate_size
    biases = [layout.part(name).offset // 2 if layout.has_bias else -1 for name in ("gate_up.bias", "down.bias")]
    return KernelPlan(fmt.bits, fmt.group_size, h, i, projection("gate", i, h), projection("up", i, h),
                      projection("down", h, i), *biases)
