"""One routed expert at one precision as one contiguous blob: the unit the runtime copies.

Layout of a blob (offsets in bytes from the blob's start; every part starts on a
:data:`PART_ALIGN`-byte boundary and the blob is zero-padded to a multiple of :data:`BLOB_ALIGN`):

=====  ================  ==========================================================
order  part              contents (``H`` hidden size, ``I`` expert width)
=====  ================  ==========================================================
1      ``gate.weight``   gate_proj ``[I, H]`` in the precision's payload form
2      ``up.weight``     up_proj ``[I, H]``
3      ``down.weight``   down_proj ``[H, I]``
4      ``gate.scales``   fp16 scales (int8: ``[I]``; int4/3/2: ``[I, ceil(H/g)]``)
5      ``up.scales``
6      ``down.scales``
7      ``gate.mins``     fp16 mins (int4/3/2 only), same shapes as the scales
8      ``up.mins``
9      ``down.mins``
10     ``gate_up.bias``  bf16 ``[2I]``, gate then up (families with biased experts only)
11     ``down.bias``     bf16 ``[H]``
=====  ================  ==========================================================

bf16 blobs hold parts 1-3 only; int8 blobs parts 1-6; biases (GPT-OSS) follow at every precision,
unquantized, so every copy of an expert carries them and a slot holds all an expert needs. Payload
forms and the bit packing are those of :mod:`dymoe.quant.formats` and :mod:`dymoe.quant.reference`;
weights keep the Hugging Face orientation ``[out, in]``. Payloads come first and gate directly precedes up, so when a payload's
size is a multiple of :data:`PART_ALIGN` (it is for every published model's shapes) gate and up form
one fused ``[2I, ...]`` matrix that a kernel can read as a single operand. :class:`BlobLayout`
records every part's offset, shape and dtype, so no reader re-derives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dymoe.quant.formats import QuantFormat, parse_format, part_specs
from dymoe.quant.reference import QuantizedTensor, dequantize, quantize

BLOB_ALIGN = 4096  # a page: blobs can be read with O_DIRECT and mapped views are page aligned
PART_ALIGN = 256  # enough for any vector load or TMA descriptor on current GPUs
PROJECTIONS = ("gate", "up", "down")
KINDS = ("weight", "scales", "mins")
BIAS_PARTS = ("gate_up.bias", "down.bias")


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Part:
    """Where one tensor lies inside a blob."""

    name: str  # "<projection>.<kind>", e.g. "down.scales"
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class BlobLayout:
    """The layout shared by every blob of one precision in one store."""

    format: QuantFormat
    rounding: str
    hidden_size: int
    intermediate_size: int
    parts: tuple[Part, ...]
    nbytes: int  # padded size of one blob, a multiple of BLOB_ALIGN

    @property
    def has_bias(self) -> bool:
        """Whether the blobs carry the expert's biases (parts ``gate_up.bias`` and ``down.bias``)."""
        return any(p.name in BIAS_PARTS for p in self.parts)

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"{self.format.name} blobs have no part {name!r}")

    def to_json(self) -> dict:
        f = self.format
        return {
            "format": {"name": f.name, "bits": f.bits, "group_size": f.group_size, "symmetric": f.symmetric},
            "rounding": self.rounding, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "nbytes": self.nbytes,
            "parts": [{"name": p.name, "offset": p.offset, "nbytes": p.nbytes, "shape": list(p.shape),
                       "dtype": str(p.dtype).removeprefix("torch.")} for p in self.parts],
        }

    @classmethod
    def from_json(cls, data: dict) -> "BlobLayout":
        parts = tuple(Part(p["name"], p["offset"], p["nbytes"], tuple(p["shape"]), getattr(torch, p["dtype"]))
                      for p in data["parts"])
        return cls(QuantFormat(**data["format"]), data["rounding"], data["hidden_size"],
                   data["intermediate_size"], parts, data["nbytes"])


def blob_layout(fmt: QuantFormat, hidden_size: int, intermediate_size: int, rounding: str = "nearest",
                bias: bool = False) -> BlobLayout:
    """The layout of one expert's blob at ``fmt``, with bias parts when ``bias`` (see the module
    docstring for the order)."""
    shapes = {"gate": (intermediate_size, hidden_size), "up": (intermediate_size, hidden_size),
              "down": (hidden_size, intermediate_size)}
    specs = {proj: {s.name: s for s in part_specs(fmt, *shapes[proj])} for proj in PROJECTIONS}
    parts, offset = [], 0
    for kind in KINDS:
        for proj in PROJECTIONS:
            spec = specs[proj].get(kind)
            if spec is None:
                continue
            parts.append(Part(f"{proj}.{kind}", offset, spec.nbytes, spec.shape, spec.dtype))
            offset = _align(offset + spec.nbytes, PART_ALIGN)
    for name, length in zip(BIAS_PARTS, (2 * intermediate_size, hidden_size)) if bias else ():
        parts.append(Part(name, offset, 2 * length, (length,), torch.bfloat16))
        offset = _align(offset + 2 * length, PART_ALIGN)
    return BlobLayout(fmt, rounding, hidden_size, intermediate_size, tuple(parts), _align(offset, BLOB_ALIGN))


def expert_blob_bytes(config, precision: str, group_size: int = 128) -> int:
    """Bytes of one routed expert of a model (its :class:`~dymoe.models.config.ModelConfig`) at
    ``precision`` as the expert store holds it: a page-aligned blob, also the size of its slot."""
    return blob_layout(parse_format(precision, group_size=group_size), config.hidden_size,
                       config.moe_intermediate_size, bias=config.expert_bias).nbytes


def encode_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, layout: BlobLayout,
                  bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Quantize one expert into ``layout`` and return its blob as a uint8 tensor of ``layout.nbytes``;
    ``bias`` (gate_up [2I], down [H]) is required exactly when the layout has bias parts."""
    if (bias is not None) != layout.has_bias:
        raise ValueError(f"{layout.format.name} layout {'has' if layout.has_bias else 'has no'} bias parts, "
                         f"but the expert was given {'no ' if bias is None else ''}biases")
    blob = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = split_blob(blob, layout)
    for proj, w in zip(PROJECTIONS, (gate, up, down)):
        q = quantize(w, layout.format, layout.rounding)
        for kind, tensor in zip(KINDS, (q.payload, q.scales, q.mins)):
            if tensor is not None:
                views[f"{proj}.{kind}"].copy_(tensor.reshape(views[f"{proj}.{kind}"].shape))
    for name, tensor in zip(BIAS_PARTS, bias or ()):
        views[name].copy_(tensor.reshape(views[name].shape))
    return blob


def split_blob(blob: torch.Tensor, layout: BlobLayout) -> dict[str, torch.Tensor]:
    """Zero-copy typed views of every part of ``blob`` (a 1-D uint8 tensor), keyed by part name."""
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() < layout.nbytes:
        raise ValueError(f"expected a 1-D uint8 blob of {layout.nbytes} bytes, got {blob.dtype} {tuple(blob.shape)}")
    return {p.name: blob[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.shape) for p in layout.parts}


def expert_quantized(blob: torch.Tensor, layout: BlobLayout) -> tuple[QuantizedTensor, ...]:
    """(gate, up, down) of a blob as :class:`QuantizedTensor` views, for kernels and tests."""
    views = split_blob(blob, layout)
    shapes = {p.name.split(".")[0]: p.shape for p in layout.parts if p.name.endswith(".weight")}
    out = []
    for proj in PROJECTIONS:
        rows = shapes[proj][0]
        cols = layout.hidden_size if proj != "down" else layout.intermediate_size
        out.append(QuantizedTensor(views[f"{proj}.weight"], views.get(f"{proj}.scales"), views.get(f"{proj}.mins"),
                                   (rows, cols), layout.format, layout.rounding))
    return tuple(out)


def expert_biases(blob: torch.Tensor, layout: BlobLayout) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gate_up bias [2I], down bias [H]) of a blob as bf16 views, or None when it has none."""
    if not layout.has_bias:
        return None
    views = split_blob(blob, layout)
    return views["gate_up.bias"], views["down.bias"]


def unpack_expert(blob: torch.Tensor, layout: BlobLayout,
                  dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantized (gate [I, H], up [I, H], down [H, I]) of one blob, in ``dtype``."""
    gate, up, down = (dequantize(q, dtype) for q in expert_quantized(blob, layout))
    return gate, up, down
