"""Fused expert kernels that read the store's formats in place from pool slots (GPU, Triton).

:func:`expert_decode` is the one entry point of the per-layer decode step for every precision
(bf16, int8, int4, int3, int2): on a CUDA pool with Triton installed (the ``gpu`` extra) it runs two
Triton launches (:mod:`dymoe.quant.kernels.triton_experts`); anywhere else it runs the torch
definition (:func:`~dymoe.quant.kernels.reference.reference_decode`), which has the same arguments
and semantics. :func:`dequantize_experts` is the prefill counterpart: several experts of one
precision dequantized in one launch into a preallocated :class:`DequantWorkspace`, for bf16 matmuls.
See docs/kernels.md for the design and measurements.

The fused decode kernels compute every expert of :mod:`dymoe.models.expert_math`: plain SwiGLU, and
GPT-OSS's biased experts with their clamped activation (the biases are read in place from the blob,
the activation is a constexpr of the launch). Prefill uses :func:`dequantize_experts` (a
dequantization knows nothing of activations), which also copies the blobs' biases out when asked.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from dymoe.checkpoint.blob import BIAS_PARTS, BlobLayout
from dymoe.models.expert_math import SWIGLU, ExpertMath
from dymoe.quant.kernels.plan import KernelPlan, kernel_plan
from dymoe.quant.kernels.reference import decode_routing, reference_decode, reference_dequantize

__all__ = ["BACKENDS", "DequantWorkspace", "InputPacking", "KernelPlan", "copy_biases", "decode_routing",
           "decode_workspace", "dequantize_experts", "expert_decode", "expert_decode_capturable", "input_packing",
           "kernel_plan", "kernels_run_on", "reference_decode", "reference_dequantize", "routed_decode", "sm_count",
           "triton_available"]

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels can be imported (the ``gpu`` extra is installed)."""
    return importlib.util.find_spec("triton") is not None


MIN_CAPABILITY = (8, 0)  # the kernels' bf16 tiles go through tl.dot, which needs Ampere's tensor cores


def kernels_run_on(device) -> bool:
    """Whether the Triton expert kernels run on CUDA ``device``: Triton installed and compute
    capability 8.0+ (Turing and older GPUs take the torch path)."""
    return triton_available() and _capability(torch.device(device)) >= MIN_CAPABILITY


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)  # (asked once per device: _resolve runs per launch)


@functools.cache
def sm_count(device: torch.device) -> int:
    """CUDA ``device``'s streaming multiprocessors (what the kernels size their grids by), asked once."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``): on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=64)
def _plan(layout: BlobLayout) -> KernelPlan:
    return kernel_plan(layout)


def expert_decode(pool: torch.Tensor, slot_offsets: torch.Tensor, layout: BlobLayout, x: torch.Tensor,
                  combine: torch.Tensor, backend: str = "auto", workspace=None,
                  math: ExpertMath = SWIGLU, x_packed: torch.Tensor | None = None) -> torch.Tensor:
    """``y[t] = sum_e combine[t, e] * expert_e(x[t])`` for a few tokens through one layer's experts.

    ``pool`` is the slot pool's 1-D uint8 buffer; ``slot_offsets`` [E] int64 (on the pool's device)
    are the byte offsets of the experts' blobs in it, each laid out as ``layout`` (one precision);
    ``x`` [T, H] are the tokens' hidden states (bf16 on the GPU, T <= 16); ``combine`` [T, E] (float32,
    or another float dtype, read as float32) holds token t's router weight for expert e, zero where t
    does not use e (an all-zero column is skipped; :func:`decode_routing` builds both from top-k slot
    ids without a host sync, :func:`routed_decode` calls this with them). Returns
    [T, H] in ``x.dtype``. ``backend``: "auto" (Triton on CUDA when installed, else torch),
    "triton" (also under ``TRITON_INTERPRET=1`` on CPU tensors) or "torch". ``workspace``: a
    :class:`~dymoe.quant.kernels.triton_experts.DecodeWorkspace` allocated once, so the Triton path
    allocates nothing but its [T, H] result (ignored by the torch backend). ``math``: the experts'
    activation (biases come with the blobs when the layout has them). ``x_packed``: one token's x
    already packed into an :class:`InputPacking`'s buffer (by the router's launch), so the Triton
    step packs nothing (the torch path reads x).
    """
    if _resolve(backend, pool) == "torch":
        return reference_decode(pool, slot_offsets, layout, x, combine, math)
    from dymoe.quant.kernels.triton_experts import launch_decode

    return launch_decode(pool, slot_offsets, _plan(layout), x, combine, workspace, math=math, x_packed=x_packed)


@dataclass(frozen=True)
class InputPacking:
    """Where a one-token expert step wants its input [H] as the packed activation vector of its
    kernels (int4, int3 and int2 steps, docs/kernels.md), written before the step by the router's
    launch (:func:`dymoe.models.fused.route_decode`), which reads the same input whole anyway: the
    step then packs nothing, a launch and its wait fewer. ``buffer``: int32 words of the vector;
    ``bits``: the format its chunks are cut for; ``hidden_size``: the input's width."""

    buffer: torch.Tensor
    bits: int
    hidden_size: int


def input_packing(layout: BlobLayout, experts: int, device) -> InputPacking | None:
    """An :class:`InputPacking` (a new buffer on ``device``) for one token's Triton step through
    ``experts`` experts of ``layout`` where that step runs on a packed input (a CUDA device with
    the kernels, or the CPU under Triton's interpreter); None where it packs nothing (bf16, int8)
    or the torch path runs. Hand its buffer to :func:`expert_decode` or :func:`routed_decode` as
    ``x_packed`` only after the router filled it for the same input."""
    device = torch.device(device)
    if not (kernels_run_on(device) if device.type == "cuda" else triton_available() and interpreting()):
        return None
    from dymoe.quant.kernels.triton_experts import packed_words, step_runs_packed

    plan = _plan(layout)
    if not step_runs_packed(plan, experts, device):
        return None
    h = plan.hidden_size
    return InputPacking(torch.zeros(packed_words(h, plan.bits), dtype=torch.int32, device=device), plan.bits, h)


def routed_decode(pool: torch.Tensor, slot_table: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
                  layout: BlobLayout, x: torch.Tensor, backend: str = "auto", workspace=None,
                  math: ExpertMath = SWIGLU, x_packed: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`expert_decode` for tokens routed to pool slots ``slot_ids`` [T, k] with router weights
    ``weights`` [T, k] (any float dtype), ``slot_table`` [S] every slot's byte offset. One token on
    the Triton path hands the kernels the table and the ids as they are: they look the offsets up
    and read the weights in float32 themselves, two launches fewer per step than
    :func:`decode_routing` (a gather and a cast: 1.9 and 1.7 us a layer in an H100 profile).
    Otherwise :func:`decode_routing` then :func:`expert_decode`. ``x_packed``: as in :func:`expert_decode`."""
    if slot_ids.shape[0] == 1 and _resolve(backend, pool) == "triton":
        from dymoe.quant.kernels.triton_experts import launch_decode

        return launch_decode(pool, slot_table, _plan(layout), x, weights, workspace, math=math, slot_ids=slot_ids[0],
                             x_packed=x_packed)
    offsets, combine = decode_routing(slot_table, slot_ids, weights)
    return expert_decode(pool, offsets, layout, x, combine, backend, workspace, math, x_packed)


def expert_decode_capturable(device) -> bool:
    """Whether :func:`expert_decode` with backend "auto" on ``device`` is device work only, so a CUDA
    graph can record it: on CUDA only through the Triton kernels (the torch reference reads the
    slot offsets on the host). Off CUDA nothing is recorded and the split decode runs as it is."""
    return torch.device(device).type != "cuda" or kernels_run_on(device)


def _resolve(backend: str, pool: torch.Tensor) -> str:
    """The backend that runs for ``backend`` (see :func:`expert_decode`) on ``pool``'s device."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if pool.is_cuda and kernels_run_on(pool.device) else "torch"
    if backend == "triton" and not (pool.is_cuda or interpreting()):
        raise ValueError("the Triton backend needs a CUDA pool (or TRITON_INTERPRET=1)")
    if backend == "triton" and pool.is_cuda and (have := _capability(pool.device)) < MIN_CAPABILITY:
        raise ValueError(f"the Triton expert kernels need compute capability 8.0+ (Ampere or newer), this GPU "
                         f"has {'.'.join(map(str, have))}: use backend 'auto' or 'torch'")
    return backend


def decode_workspace(layout: BlobLayout, max_experts: int, max_tokens: int, device):
    """Scratch for :func:`expert_decode`'s Triton path, to allocate once at start-up (a
    :class:`~dymoe.quant.kernels.triton_experts.DecodeWorkspace`); None where the torch path runs.
    ``max_experts`` is the most routing columns a step passes (T*k with :func:`decode_routing`)."""
    if torch.device(device).type != "cuda" or not kernels_run_on(device):
        return None
    from dymoe.quant.kernels.triton_experts import DecodeWorkspace

    return DecodeWorkspace.allocate(_plan(layout), max_experts, max_tokens, device)


@dataclass
class DequantWorkspace:
    """Where :func:`dequantize_experts` writes: ``gate_up`` [capacity, 2I, H] and ``down``
    [capacity, H, I] in the compute dtype, allocated once at start-up (prefill then allocates no
    weight-sized memory). One workspace serves one stream: a launch may overwrite an expert only
    after the matmuls that read it were queued."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None  # [capacity, 2I] when the blobs carry biases
    down_bias: torch.Tensor | None = None  # [capacity, H]

    @classmethod
    def allocate(cls, layout: BlobLayout, capacity: int, device, dtype: torch.dtype) -> "DequantWorkspace":
        h, i = layout.hidden_size, layout.intermediate_size
        biases = ((torch.empty(capacity, 2 * i, dtype=dtype, device=device),
                   torch.empty(capacity, h, dtype=dtype, device=device)) if layout.has_bias else ())
        return cls(torch.empty(capacity, 2 * i, h, dtype=dtype, device=device),
                   torch.empty(capacity, h, i, dtype=dtype, device=device), *biases)

    @property
    def capacity(self) -> int:
        return self.gate_up.shape[0]

    def views(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts ``first .. first+n`` of the workspace (views, no copy)."""
        if first + n > self.capacity:
            raise ValueError(f"workspace holds {self.capacity} experts, asked for {first}..{first + n}")
        return self.gate_up[first:first + n], self.down[first:first + n]

    def bias_views(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Biases of experts ``first .. first+n`` (views), or None when the blobs have none."""
        if self.gate_up_bias is None:
            return None
        self.views(first, n)  # the range check
        return self.gate_up_bias[first:first + n], self.down_bias[first:first + n]


def dequantize_experts(pool: torch.Tensor, slot_offsets: torch.Tensor, layout: BlobLayout, gate_up: torch.Tensor,
                       down: torch.Tensor, backend: str = "auto", config=None,
                       biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Dequantize the experts whose blobs start at byte ``slot_offsets`` [n] (int64, on the pool's
    device) of ``pool`` (the slot pool's 1-D uint8 buffer), all laid out as ``layout``, into
    ``gate_up`` [n, 2I, H] (gate rows, then up rows) and ``down`` [n, H, I] (contiguous, e.g.
    :meth:`DequantWorkspace.views`), in their dtype. Values equal
    :func:`~dymoe.checkpoint.blob.unpack_expert`'s bit for bit, in every format (bf16 is a copy).
    ``backend`` as in :func:`expert_decode`: the Triton path is one launch and no host sync;
    ``config``: a :class:`~dymoe.quant.kernels.dequant.DequantConfig` (Triton tiles). ``biases``:
    (gate_up [n, 2I], down [n, H]) to copy the blobs' biases into (:func:`copy_biases`)."""
    n = slot_offsets.numel()
    if gate_up.shape[0] != n or down.shape[0] != n or not (gate_up.is_contiguous() and down.is_contiguous()):
        raise ValueError(f"expected contiguous outputs of {n} experts, got {tuple(gate_up.shape)} and "
                         f"{tuple(down.shape)}")
    if biases is not None:
        copy_biases(pool, slot_offsets, layout, *biases)
    if _resolve(backend, pool) == "torch":
        reference_dequantize(pool, slot_offsets, layout, gate_up, down)
        return
    from dymoe.quant.kernels.dequant import launch_dequantize

    launch_dequantize(pool, slot_offsets, _plan(layout), gate_up, down, config)


def copy_biases(pool: torch.Tensor, slot_offsets: torch.Tensor, layout: BlobLayout, gate_up_bias: torch.Tensor,
                down_bias: torch.Tensor) -> None:
    """The bf16 biases of the blobs at byte ``slot_offsets`` [n] of ``pool`` into ``gate_up_bias``
    [n, 2I] and ``down_bias`` [n, H] (in their dtype): one gather each, on the device, no host sync."""
    words = pool.view(torch.bfloat16)  # blobs and their parts start at even offsets
    for name, out in zip(BIAS_PARTS, (gate_up_bias, down_bias)):
        part = layout.part(name)
        index = (slot_offsets.unsqueeze(1) + part.offset) // 2 + torch.arange(part.shape[0], device=pool.device)
        out.copy_(words[index])
