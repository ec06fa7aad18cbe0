"""The torch definition of the fused expert step: what the Triton kernels compute, and their fallback.

For tokens ``x`` [T, H], experts given by the byte offsets of their blobs in a pool buffer
(``slot_offsets`` [E]) and a dense routing matrix ``combine`` [T, E] (token t's router weight for
expert e, zero where t does not use e)::

    y[t] = sum_e combine[t, e] * down_e( silu(gate_e x[t]) * up_e x[t] )

with every weight dequantized by :func:`dymoe.quant.reference.dequantize` and the arithmetic done in
float32, then cast to ``x.dtype``. An expert whose column of ``combine`` is all zero is skipped
(its weights are never read): that is how :func:`decode_routing` marks duplicate slots without a
host synchronisation. :func:`reference_decode` also computes the experts the fused kernels do not
know (biases, GPT-OSS's clamped activation: :mod:`dymoe.models.expert_math`).
"""

from __future__ import annotations

import torch

from dymoe.checkpoint.blob import BlobLayout, expert_biases, unpack_expert
from dymoe.models.expert_math import SWIGLU, ExpertMath


def reference_decode(pool: torch.Tensor, slot_offsets: torch.Tensor, layout: BlobLayout, x: torch.Tensor,
                     combine: torch.Tensor, math: ExpertMath = SWIGLU) -> torch.Tensor:
    """Dequantize-then-matmul in float32, one expert at a time (slow; syncs to read the offsets),
    with the blobs' biases if they carry them and ``math``'s activation."""
    xf = x.float()
    out = torch.zeros_like(xf)
    weights = combine.float()
    for e, offset in enumerate(slot_offsets.tolist()):
        if not bool(weights[:, e].any()):
            continue
        blob = pool[offset:offset + layout.nbytes]
        gate, up, down = unpack_expert(blob, layout, torch.float32)
        gate_x, up_x = xf @ gate.T, xf @ up.T
        biases = expert_biases(blob, layout)
        if biases is not None:
            gate_up_bias, down_bias = (b.float() for b in biases)
            gate_x, up_x = gate_x + gate_up_bias[:gate.shape[0]], up_x + gate_up_bias[gate.shape[0]:]
        y = math.glu(gate_x, up_x) @ down.T
        out += weights[:, e:e + 1] * (y if biases is None else y + down_bias)
    return out.to(x.dtype)


def reference_dequantize(pool: torch.Tensor, slot_offsets: torch.Tensor, layout: BlobLayout, gate_up: torch.Tensor,
                         down: torch.Tensor) -> None:
    """Expert j's blob at ``slot_offsets[j]`` dequantized by :func:`~dymoe.checkpoint.blob.unpack_expert`
    into ``gate_up[j]`` ([2I, H]: gate rows, then up rows) and ``down[j]`` ([H, I]), in their dtype;
    one expert at a time (and one host sync to read the offsets)."""
    for j, offset in enumerate(slot_offsets.tolist()):
        gate, up, w_down = unpack_expert(pool[offset:offset + layout.nbytes], layout, gate_up.dtype)
        i = gate.shape[0]
        gate_up[j, :i].copy_(gate)
        gate_up[j, i:].copy_(up)
        down[j].copy_(w_down)


def decode_routing(slot_table: torch.Tensor, slot_ids: torch.Tensor,
                   weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_offsets [E], combine [T, E]) for tokens routed to pool slots ``slot_ids`` [T, k] with
    router weights ``weights`` [T, k]; ``slot_table`` [S] holds every slot's byte offset (int64, on
    the compute device).

    Without a host synchronisation: a slot chosen by several tokens appears once per choice in
    ``slot_offsets``, but only its first occurrence has non-zero weights, so the kernels read its
    weights once for all the tokens. One token never picks a slot twice, so the scatter below has
    no colliding writes and the result is deterministic.
    """
    t, k = slot_ids.shape
    if t == 1:
        return slot_table[slot_ids[0]], weights.float()
    flat = slot_ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    position = torch.arange(flat.numel(), device=flat.device)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    leader = torch.cummax(torch.where(first, position, 0), dim=0).values
    column = torch.empty_like(leader)
    column[order] = leader
    combine = torch.zeros(t, flat.numel(), dtype=torch.float32, device=flat.device)
    combine[position // k, column] = weights.reshape(-1).float()
    return slot_table[sorted_ids], combine


def random_pool(layout: BlobLayout, experts: int, seed: int = 0, device: torch.device | str = "cpu",
                spare_bytes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool buffer of ``experts`` random blobs of ``layout`` and their byte offsets (int64 on
    ``device``), for kernel tests and benchmarks: random codes (every bit pattern is a valid code),
    fp16 scales and mins of a 0.02-std-like weight, bf16 weights ~ N(0, 0.02). Much faster than
    quantizing real weights at Mixtral's size. Blobs are placed ``layout.nbytes + spare_bytes``
    apart, so a kernel that reads past a blob reads another one's bytes, not zeros."""
    gen = torch.Generator(device=device).manual_seed(seed)
    stride = layout.nbytes + spare_bytes
    pool = torch.randint(0, 256, (experts * stride,), dtype=torch.uint8, device=device, generator=gen)
    fmt = layout.format
    for e in range(experts):
        for part in layout.parts:
            view = pool[e * stride + part.offset:e * stride + part.offset + part.nbytes].view(part.dtype)
            kind = part.name.split(".")[1]
            if fmt.is_raw:
                view.normal_(0.0, 0.02, generator=gen)
            elif kind == "scales":
                view.uniform_(0.5, 1.5, generator=gen).mul_(0.06 / max(fmt.max_code, 127) if not fmt.is_grouped
                                                             else 0.1 / fmt.max_code)
            elif kind == "mins":
                view.uniform_(-0.06, -0.04, generator=gen)
            elif kind == "bias":
                view.normal_(0.0, 0.02, generator=gen)
    offsets = torch.arange(experts, dtype=torch.int64, device=device) * stride
    return pool, offsets
