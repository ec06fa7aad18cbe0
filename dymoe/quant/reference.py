"""Reference quantize / dequantize / bit packing in plain torch: the definition fast kernels must match.

Packing layout (all widths, one rule). Codes are packed row by row along the input dimension as a
little-endian bit stream: code ``k`` of a row occupies bits ``[k*b, (k+1)*b)``, counting from bit 0
of byte 0. Codes therefore come in whole *words* of ``8/gcd(b, 8)`` codes:

- int4: 2 codes per byte, code ``2j`` in the low nibble, ``2j+1`` in the high nibble;
- int2: 4 codes per byte, code ``4j+i`` in bits ``[2i, 2i+2)``;
- int3: 8 codes in 3 bytes; ``word = b0 | b1 << 8 | b2 << 16`` and code ``8j+i`` is
  ``(word >> 3i) & 7``. A kernel loads the 3 bytes into one 32-bit register and shifts, so no code
  straddles a register even though two straddle a byte;
- int8: one two's-complement byte per code.

Each row starts on a byte boundary, so row ``r`` of a ``[out, in]`` weight starts at
``r * packed_row_bytes`` and a kernel needs no per-row bit offset.

Error bounds (``s``, ``m`` are a group's stored fp16 scale and min; the dequantized value is
computed in float32):

- int8, round to nearest: ``|w - ŵ| <= s/2`` (the scale is rounded *up* to fp16, so nothing clips);
- all: plus float32 rounding of the dequantization itself (``2**-20`` of the group's range);
- int4/int3/int2, round to nearest: ``|w - ŵ| <= s/2 + 2**-9 * |m| + 2**-24``; the second term
  covers the fp16 rounding of the min (rounded *down* so the range never shrinks), which only
  matters for a group whose spread is tiny next to its offset;
- int4/int3/int2, ``rounding="hqq"``: ``|w - ŵ| <= s + 2**-9 * |m| + 2**-24``, because the min
  moves at most half a step from its round-to-nearest value (so a clipped code is off by at most one
  more half step). Mean error is lower than round-to-nearest on heavy-tailed weights.

:func:`error_bound` returns these bounds per group, so tests and callers need not re-derive them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dymoe.quant.formats import SCALE_DTYPE, QuantFormat, num_groups, packed_row_bytes

ROUNDINGS = ("nearest", "hqq")
MIN_SCALE = 2.0**-24  # smallest positive fp16; keeps a constant group's scale non-zero


@dataclass
class QuantizedTensor:
    """One ``[out, in]`` weight in a storage format: packed ``payload`` plus fp16 ``scales``/``mins``."""

    payload: torch.Tensor  # packed uint8 codes; bf16 weights for bf16, int8 codes for int8
    scales: torch.Tensor | None
    mins: torch.Tensor | None
    shape: tuple[int, int]
    format: QuantFormat
    rounding: str = "nearest"


# ---- bit packing -------------------------------------------------------------------------------


def _word(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing word for ``bits``-bit codes."""
    codes = 8 // math.gcd(bits, 8)
    return codes, codes * bits // 8


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of ``values`` (uint8 codes ``< 2**bits``) as described in the module
    docstring; the last dimension is zero-padded to whole words first."""
    if values.dtype != torch.uint8:
        raise ValueError(f"pack_bits expects uint8 codes, got {values.dtype}")
    if values.numel() and int(values.max()) >= 1 << bits:
        raise ValueError(f"a code is >= 2**{bits}: it does not fit in {bits} bits")
    codes, nbytes = _word(bits)
    n = values.shape[-1]
    padded = -(-n // codes) * codes
    v = torch.nn.functional.pad(values, (0, padded - n)).to(torch.int32)
    v = v.reshape(*values.shape[:-1], padded // codes, codes)
    shifts = torch.arange(codes, dtype=torch.int32, device=v.device) * bits
    word = (v << shifts).sum(dim=-1, keepdim=True)
    out = (word >> (torch.arange(nbytes, dtype=torch.int32, device=v.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(*values.shape[:-1], packed_row_bytes(bits, n))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes of each row of ``packed`` as uint8."""
    codes, nbytes = _word(bits)
    if packed.shape[-1] != packed_row_bytes(bits, n):
        raise ValueError(f"{packed.shape[-1]} packed bytes per row do not hold {n} {bits}-bit codes")
    if nbytes == 1:  # whole codes per byte (int2, int4): shift the bytes themselves, no 32-bit words
        shifts = torch.arange(codes, dtype=torch.uint8, device=packed.device) * bits
        v = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return v.reshape(*packed.shape[:-1], -1)[..., :n]
    b = packed.reshape(*packed.shape[:-1], -1, nbytes).to(torch.int32)
    word = b[..., 0]
    for i in range(1, nbytes):  # (int3: three bytes per word) little-endian, OR-ed, not summed
        word = word | (b[..., i] << (8 * i))
    v = (word.unsqueeze(-1) >> (torch.arange(codes, dtype=torch.int32, device=b.device) * bits)) & ((1 << bits) - 1)
    return v.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


_CODE_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def unpack_float(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """``unpack_bits(packed, bits, n).float()``, for int4 and int2 through a table of each byte's
    codes as floats: one gather instead of the shift, mask and conversion passes. Same values, so
    the same results; a Qwen3-30B-A3B layer step on 2 threads of the build machine's Xeon, int4
    40.8 -> 31.2 ms (``python benchmarks/cpu_decode.py``, section 2; docs/decode.md "On the CPU")."""
    codes, nbytes = _word(bits)
    if nbytes != 1:  # int3 (24-bit words), int8
        return unpack_bits(packed, bits, n).float()
    if packed.shape[-1] != packed_row_bytes(bits, n):
        raise ValueError(f"{packed.shape[-1]} packed bytes per row do not hold {n} {bits}-bit codes")
    key = (bits, packed.device)
    if key not in _CODE_TABLES:
        byte = torch.arange(256, dtype=torch.int32, device=packed.device)
        shifts = torch.arange(codes, dtype=torch.int32, device=packed.device) * bits
        _CODE_TABLES[key] = ((byte.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).float()  # [256, codes]
    values = torch.nn.functional.embedding(packed.int(), _CODE_TABLES[key])
    return values.reshape(*packed.shape[:-1], -1)[..., :n]


# ---- fp16 rounding with a direction ------------------------------------------------------------


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 towards +inf, so a stored scale never shrinks the quantization range."""
    h = x.to(SCALE_DTYPE)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 towards -inf, so a stored min never lies above the group's minimum."""
    h = x.to(SCALE_DTYPE)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


# ---- quantize ----------------------------------------------------------------------------------


def quantize(w: torch.Tensor, fmt: QuantFormat, rounding: str = "nearest") -> QuantizedTensor:
    """Quantize a 2-D weight ``[out, in]`` into ``fmt`` (see :mod:`dymoe.quant.formats`).

    ``rounding="hqq"`` refines each group's min by half-quadratic optimisation (see
    :func:`_hqq_mins`); it applies to the group formats and is ignored by bf16 and int8.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}: choose from {', '.join(ROUNDINGS)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite values")
    shape = (w.shape[0], w.shape[1])
    if fmt.is_raw:
        payload = w.to(torch.bfloat16).contiguous()
        return QuantizedTensor(payload, None, None, shape, fmt)
    if not fmt.is_grouped:
        return _quantize_int8(w.float(), fmt)
    return _quantize_grouped(w.float(), fmt, rounding)


def _quantize_int8(w: torch.Tensor, fmt: QuantFormat) -> QuantizedTensor:
    scales = _fp16_up((w.abs().amax(dim=1) / 127).clamp_min(MIN_SCALE))
    codes = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantizedTensor(codes, scales, None, (w.shape[0], w.shape[1]), fmt)


def _groups(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``w`` as ``[out, G, g]``; a partial last group is padded by repeating the row's last column,
    which leaves the group's min and max unchanged."""
    out, n = w.shape
    padded = num_groups(fmt, n) * fmt.group_size
    if padded > n:
        w = torch.cat([w, w[:, -1:].expand(out, padded - n)], dim=1)
    return w.reshape(out, -1, fmt.group_size)


def _codes(g: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    return torch.round((g - mins[..., None]) / scales[..., None]).clamp(0, fmt.max_code)


def _quantize_grouped(w: torch.Tensor, fmt: QuantFormat, rounding: str) -> QuantizedTensor:
    g = _groups(w, fmt)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = _fp16_up(((hi - lo) / fmt.max_code).clamp_min(MIN_SCALE))
    mins = _fp16_down(lo)
    if rounding == "hqq":
        mins = _fp16_down(_hqq_mins(g, scales.float(), mins.float(), fmt))
    codes = _codes(g, scales.float(), mins.float(), fmt).to(torch.uint8).reshape(w.shape[0], -1)
    payload = pack_bits(codes, fmt.bits)
    return QuantizedTensor(payload, scales, mins, (w.shape[0], w.shape[1]), fmt, rounding)


def _hqq_mins(g: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, fmt: QuantFormat,
              iters: int = 20, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01) -> torch.Tensor:
    """Half-quadratic refinement of each group's min at a fixed scale (HQQ, Badri & Shaji 2023).

    It minimises the l_p (p < 1) error, which lets a few outliers stay badly represented so that the
    bulk of the group is rounded well: alternately round the codes, split off the sparse error with
    the generalised shrinkage operator, and refit the min in closed form. The min is kept within
    half a step of its round-to-nearest value, which is what the documented error bound relies on.
    """
    nearest, best = mins, mins
    best_err = torch.full_like(mins, math.inf)
    for _ in range(iters + 1):
        codes = _codes(g, scales, mins, fmt)
        residual = g - (codes * scales[..., None] + mins[..., None])
        err = residual.abs().pow(p).sum(dim=-1)
        improved = err < best_err
        if not bool(improved.any()):
            break  # as in HQQ: stop once no group's error decreases
        best, best_err = torch.where(improved, mins, best), torch.where(improved, err, best_err)
        mins = (g - _shrink_lp(residual, beta, p) - codes * scales[..., None]).mean(dim=-1)
        mins = torch.minimum(torch.maximum(mins, nearest - scales / 2), nearest + scales / 2)
        beta *= kappa
    return best


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal operator of ``|x|^p / beta`` (HQQ eq. 6)."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * (x.abs() + 1e-8).pow(p - 1))


# ---- dequantize --------------------------------------------------------------------------------


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The ``[out, in]`` weight that ``q`` stands for, computed in float32 and cast to ``dtype``."""
    out, n = q.shape
    fmt = q.format
    if fmt.is_raw:
        return q.payload.reshape(out, n).to(dtype)
    if not fmt.is_grouped:
        codes = q.payload.reshape(out, n).float()
        return (codes * q.scales.float().reshape(out, 1)).to(dtype)
    groups = num_groups(fmt, n)
    codes = unpack_float(q.payload.reshape(out, -1), fmt.bits, groups * fmt.group_size)
    codes = codes.reshape(out, groups, fmt.group_size)
    # in place, the same two roundings as codes * scale + min (no fused multiply-add: the prefill
    # dequantize kernel must equal this bit for bit)
    w = codes.mul_(q.scales.float().reshape(out, groups, 1)).add_(q.mins.float().reshape(out, groups, 1))
    return w.reshape(out, -1)[:, :n].to(dtype)


def error_bound(q: QuantizedTensor) -> torch.Tensor:
    """The documented bound on ``|w - dequantize(q, float32)|`` as a ``[out, in]`` float32 tensor
    (zero for bf16, whose error is bf16 rounding of the source)."""
    out, n = q.shape
    fmt = q.format
    if fmt.is_raw:
        return torch.zeros(out, n)
    if not fmt.is_grouped:
        scales = q.scales.float()
        return (scales / 2 + 2.0**-20 * 127 * scales).reshape(out, 1).expand(out, n)
    scales, mins = q.scales.float(), q.mins.float().abs()
    steps = 1.0 if q.rounding == "hqq" else 0.5
    float32_slack = 2.0**-20 * (mins + fmt.max_code * scales)
    per_group = steps * scales + 2.0**-9 * mins + MIN_SCALE + float32_slack
    return per_group.repeat_interleave(fmt.group_size, dim=1)[:, :n]
