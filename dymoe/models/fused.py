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
device), rounding its two products and their sum as the torch code does. :func:`route` is a
router's work after its linear layer in one kernel instead of six to nine (float32 scores, the
top-k or the given experts put in order, renormalised, scaled, cast); only the softmax sum's
order differs from the torch code's. :func:`combine` is a decoded token's weighted sum of its k
expert rows in one kernel instead of up to five (gather the weights, multiply, put the rows in
router order, sum); both bf16 decode paths of :func:`~dymoe.runtime.resident.decode_experts` use
it, so they still sum alike. :func:`group_plan` is the grouped decode's preparation (the token's
rows, the sort of its expert ids, each expert's end) in one kernel instead of about seven.
:func:`decode_attend` is one token's attention in the graph decode, split over the keys
(:mod:`dymoe.models.decode_attention`; ``DYMOE_DECODE_ATTENTION=sdpa`` turns that one off alone).
:func:`linear_decode` takes a decode token through a dense projection (a split-K GEMV, faster than
cuBLAS's one-row GEMMs on the shapes timed) and :func:`route_decode` a router's logits with its
routing, in one launch (``DYMOE_DECODE_LINEAR=cublas`` turns those two off alone).

On a Hopper or newer GPU each of these kernels is chained to the launch before it (:func:`chained`,
``DYMOE_DENSE_PDL``): it may start while that launch finishes, and waits for it before reading what
it wrote.

``DYMOE_FUSED_DENSE=0`` turns the kernels off (for comparison, or if one misbehaves); a bad value
is one clear error.
"""

import functools
from dataclasses import dataclass

import torch

from dymoe.env import env_choice, env_override
from dymoe.quant.kernels import InputPacking, interpreting, kernels_run_on, sm_count, triton_available


def _setting() -> bool:
    return env_choice("DYMOE_FUSED_DENSE", {"1": "fused dense kernels on CUDA, the default", "0": "off"}, "1") == "1"


ENABLED = _setting()


def _attention_setting() -> str:
    return env_choice("DYMOE_DECODE_ATTENTION", {
        "split": "one token's attention in the CUDA-graph decode split over the keys (Triton), the default",
        "sdpa": "SDPA's masked memory-efficient kernel"}, "split")


ATTENTION = _attention_setting()


def _decode_linear_setting() -> str:
    return env_choice("DYMOE_DECODE_LINEAR", {
        "triton": "a decode token's dense projections and router through linear_decode (Triton), the default",
        "cublas": "F.linear (cuBLAS) for them, and the router's top-k in its own launch"}, "triton")


DECODE_LINEAR = _decode_linear_setting()


def _pdl_setting() -> bool:
    return env_override("DYMOE_DENSE_PDL", "each fused dense kernel may start while the kernel before it finishes "
                        "(programmatic dependent launch, Hopper or newer GPUs), the default",
                        "each starts after the one before has ended") is not False


DENSE_PDL = _pdl_setting()


def chained(device: torch.device) -> dict:
    """The launch arguments that chain a fused dense kernel to the launch before it on ``device``:
    programmatic dependent launch (``launch_pdl``; the kernel's ``PDL`` lets the next launch start
    at once and waits for the one before ahead of any read of its outputs) where
    ``DYMOE_DENSE_PDL`` and the GPU allow it (:func:`~dymoe.quant.kernels.triton_experts.pdl_supported`:
    Hopper or newer, Triton 3.4 or later); else nothing (the plain launch)."""
    if not DENSE_PDL or device.type != "cuda" or interpreting():
        return {}
    from dymoe.quant.kernels.triton_experts import pdl_supported

    return {"PDL": True, "launch_pdl": True} if pdl_supported(device) else {}


def fused_applies(x: torch.Tensor) -> bool:
    """Whether the fused kernels run for ``x``: on by default for CUDA tensors when Triton is
    installed (the ``gpu`` extra), or for any tensor under ``TRITON_INTERPRET=1`` (the tests)."""
    if not ENABLED or not triton_available():
        return False
    return x.is_cuda or interpreting()


@functools.lru_cache(maxsize=1)
def _kernels():
    """:mod:`dymoe.models.fused_kernels`, imported on first use (Triton is the ``gpu`` extra)."""
    from dymoe.models import fused_kernels

    return fused_kernels


MAX_ROUTED_EXPERTS = 1024  # experts per router up to which route() runs (one program holds all scores)


def route_applies(x: torch.Tensor, experts: int) -> bool:
    """Whether :func:`route` takes a router's scores for ``x``: :func:`fused_applies`, and no more
    than MAX_ROUTED_EXPERTS experts."""
    return experts <= MAX_ROUTED_EXPERTS and fused_applies(x)


def route(logits: torch.Tensor, k: int, *, sigmoid: bool, normalize: bool, scaling: float, dtype: torch.dtype,
          ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [N, k] int64, weights [N, k] in ``dtype``) from router logits [N, E]: softmax
    (or sigmoid) scores in float32, the k best experts best first, or (``ids`` [N, k]) those
    experts put in order of score; the weights their scores, renormalised to sum to one when
    ``normalize``, times ``scaling``. One launch (:func:`~dymoe.models.fused_kernels.route_kernel`)."""
    kernels = _kernels()
    rows = logits if logits.is_contiguous() else logits.contiguous()
    n, experts = rows.shape
    out_ids = torch.empty(n, k, dtype=torch.int64, device=rows.device)
    weights = torch.empty(n, k, dtype=dtype, device=rows.device)
    given = ids.to(torch.int64).contiguous() if ids is not None else out_ids
    kernels.route_kernel[(n,)](rows, given, out_ids, weights, experts, float(scaling), K=k,
                               BLOCK=kernels.triton.next_power_of_2(experts), KB=kernels.triton.next_power_of_2(k),
                               GIVEN=ids is not None, SIGMOID=sigmoid, NORMALIZE=normalize,
                               ACCURATE=not interpreting(),
                               num_warps=1 if experts <= 128 else 4, **chained(rows.device))
    return out_ids, weights


DECODE_COUNTERS = 4096  # int32 counters per device: a linear's row blocks and a router's routing, attention heads


@dataclass(frozen=True)
class LinearConfig:
    """How :func:`linear_decode` cuts W [N, K]: row blocks of ``block_n`` rows, K in ``split``
    slices of ``steps`` steps of ``block_k`` columns, ``warps`` warps per program."""

    block_n: int
    block_k: int
    split: int
    steps: int
    warps: int = 4


LINEAR_BLOCK_N = 8  # linear_decode's rows per program (its default cut)


def linear_config(n: int, k: int, programs: int, block_n: int = LINEAR_BLOCK_N, block_k: int = 512,
                  warps: int = 4) -> LinearConfig:
    """The cut for W [N, K] aiming at ``programs`` programs: K is split only as far as the row
    blocks alone fall short of them, never into more than 16 slices. On an H100 (2026-12-06,
    ``benchmarks/decode_linear.py --sweep``) blocks of 8 rows by 512 columns were the fastest cut of
    every shape timed, unsplit wherever the row blocks numbered 2 per SM or more (a split's
    partial sums cost more than the few idle SMs)."""
    block_k = min(block_k, max(16, 1 << (k - 1).bit_length()))
    blocks, k_steps = -(-n // block_n), -(-k // block_k)
    split = max(1, min(16, k_steps, programs // blocks))
    steps = -(-k_steps // split)
    return LinearConfig(block_n, block_k, -(-k_steps // steps), steps, warps)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def decode_counters(device: torch.device) -> torch.Tensor | None:
    """The device's counters for :func:`linear_decode` and :func:`decode_attend`, whose programs
    count themselves done so that the last one finishes the work (zero between launches: each
    launch's last users reset theirs, and launches on one stream never overlap), allocated at the
    first call; None while a CUDA graph is being recorded before that (an allocation would come
    from the graph's pool)."""
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[device] = torch.zeros(DECODE_COUNTERS, dtype=torch.int32, device=device)
    return counters


def _programs(device: torch.device) -> int:
    """How many programs :func:`linear_config` aims at: 2 per SM (a few under the interpreter)."""
    return 8 if interpreting() else 2 * sm_count(device)


def linear_decode_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear_decode` takes ``x`` through ``weight`` [N, K]: one row (a decode token),
    :func:`fused_applies` and the ``triton`` setting of ``DYMOE_DECODE_LINEAR``, bf16 or float16
    for x, the weight and the bias alike, all contiguous, and the device's counters available."""
    return (DECODE_LINEAR == "triton" and x.numel() == weight.shape[-1] and weight.dim() == 2
            and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and (bias is None or bias.dtype == x.dtype and bias.is_contiguous())
            and fused_applies(x) and x.is_contiguous() and weight.is_contiguous()
            and -(-weight.shape[0] // LINEAR_BLOCK_N) < DECODE_COUNTERS and decode_counters(x.device) is not None)


def _launch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                   config: LinearConfig | None, routing: tuple | None = None, pack: InputPacking | None = None,
                   **route_flags) -> None:
    """One launch of the linear kernel into ``out``; with ``routing`` = (given ids, ids, weights,
    scaling) and the route's constexpr flags, it routes the token too (:func:`route_decode`), and
    with ``pack`` it packs x for the expert step."""
    kernels = _kernels()
    n, k = weight.shape
    config = config or linear_config(n, k, _programs(x.device))
    if -(-n // config.block_n) >= DECODE_COUNTERS:  # a benchmark's cut (linear_decode_applies checks the default)
        raise ValueError(f"{n} rows in blocks of {config.block_n} need more than {DECODE_COUNTERS} counters")
    partial = torch.empty(config.split * n if config.split > 1 else 1, dtype=torch.float32, device=x.device)
    if routing is not None:
        route_flags.update(ROUTE=True, E_BLOCK=kernels.triton.next_power_of_2(n), ACCURATE=not interpreting())
    ids_in, ids, weights, scaling = routing or (out, out, out, 1.0)  # (not read without ROUTE)
    if pack is not None:
        from dymoe.quant.kernels.triton_experts import PACK_BLOCK, PACK_WARPS, chunk_values

        if config.warps != PACK_WARPS:  # the step's packing launch sums each chunk with these warps
            raise ValueError(f"a router that packs the expert step's input runs {PACK_WARPS} warps, not {config.warps}")
        route_flags.update(PACK_BITS=pack.bits, PACK_C=-(-k // chunk_values(pack.bits)), PACK_BLOCK=PACK_BLOCK)
    kernels.linear_decode_kernel[(-(-n // config.block_n), config.split)](
        x, weight, bias if bias is not None else weight, out, partial, decode_counters(x.device), ids_in, ids, weights,
        scaling, pack.buffer if pack is not None else out, N=n, K=k, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT=config.split, STEPS=config.steps, BIAS=bias is not None, num_warps=config.warps, **route_flags,
        **chained(x.device))


def linear_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: LinearConfig | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one token x [..., K] in one launch
    (:func:`~dymoe.models.fused_kernels.linear_decode_kernel`): the products summed in float32,
    split over K where the rows alone are too few to fill the GPU (cuBLAS's one-row GEMMs left
    most SMs idle on a router's 128 rows), the bias added and the sum rounded once, as cuBLAS
    does; only the order of the sum differs. ``config``: another cut (the benchmark's)."""
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch_linear(x, weight, bias, out, config)
    return out


def route_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, *, sigmoid: bool,
                 normalize: bool, scaling: float, ids: torch.Tensor | None = None,
                 config: LinearConfig | None = None, pack: InputPacking | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route` of one token's router logits ``F.linear(x, weight, bias)``, both in one launch:
    the last of the linear's row blocks routes (:func:`linear_decode_applies` and
    :func:`route_applies` must hold). ``pack``: the launch also writes x into the expert step's
    packed input (:func:`packs_for`), so that the step packs nothing."""
    if pack is not None and not packs_for(x, pack):
        raise ValueError(f"a router's input of {x.shape[-1]} {x.dtype} values cannot be packed for a step of "
                         f"{pack.hidden_size}")
    experts = weight.shape[0]
    logits = torch.empty(experts, dtype=x.dtype, device=x.device)
    out_ids = torch.empty(1, k, dtype=torch.int64, device=x.device)
    weights = torch.empty(1, k, dtype=x.dtype, device=x.device)
    given = ids.to(torch.int64).contiguous() if ids is not None else out_ids
    _launch_linear(x, weight, bias, logits, config, (given, out_ids, weights, float(scaling)), pack, TOP_K=k,
                   KB=_kernels().triton.next_power_of_2(k), GIVEN=ids is not None, SIGMOID=sigmoid,
                   NORMALIZE=normalize)
    return out_ids, weights


def packs_for(x: torch.Tensor, pack: InputPacking) -> bool:
    """Whether :func:`route_decode` (whose input :func:`linear_decode_applies` already holds to one
    contiguous bf16 or float16 row) can pack ``x`` for ``pack``'s step: as wide."""
    return x.shape[-1] == pack.hidden_size


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dimension, one launch."""
    kernels = _kernels()
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, x), device=x.device)
    block = kernels.triton.next_power_of_2(n)
    kernels.rms_norm_kernel[(rows.shape[0],)](rows, weight, out, eps, N=n, BLOCK=block,
                                              num_warps=4 if block <= 4096 else 8, **chained(x.device))
    return out.view(*x.shape[:-1], n)


def add_rms_norm_applies(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`add_rms_norm` takes ``x + y``: :func:`fused_applies`, one shape, one dtype
    for both and the weight, both contiguous."""
    return (fused_applies(x) and x.shape == y.shape and x.dtype == y.dtype == weight.dtype
            and x.is_contiguous() and y.is_contiguous())


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``x + y``, its :func:`rms_norm`) in one launch instead of two, with the same roundings."""
    kernels = _kernels()
    n = x.shape[-1]
    total, out = torch.empty_like(x), torch.empty_like(x)
    block = kernels.triton.next_power_of_2(n)
    kernels.add_rms_norm_kernel[(x.numel() // n,)](x, y, weight, total, out, eps, N=n, BLOCK=block,
                                                   num_warps=4 if block <= 4096 else 8, **chained(x.device))
    return total, out


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
    kernels = _kernels()
    b, h, t, d = x.shape
    out = torch.empty_like(x, dtype=torch.result_type(x, cos))
    kernels.rotary_kernel[(b * h * t,)](x, out, cos, sin, positions if positions is not None else cos, start, h, t,
                                        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                                        out.stride(2), D=d, BLOCK=kernels.triton.next_power_of_2(d),
                                        FROM_DEVICE=positions is not None, num_warps=1, **chained(x.device))
    return out


def qkv_decode_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                       cache_v: torch.Tensor, table: torch.Tensor, norms: tuple | None) -> bool:
    """Whether :func:`qkv_decode` takes one decode token's projections q, k, v [1, 1, heads * D]:
    :func:`fused_applies`, one dtype for them, the caches, the rotary table (as wide as a head:
    no partial rotary) and the per-head norms' weights, and unit strides over the heads."""
    tensors = (q, k, v, cache_k, cache_v, table, *(w for w in norms or ()))
    return (fused_applies(q) and q.shape[:2] == (1, 1) and cache_k.shape[0] == 1
            and len({t.dtype for t in tensors}) == 1 and all(t.stride(-1) == 1 for t in (q, k, v))
            and table.is_contiguous()
            and table.shape[-1] == cache_k.shape[-1] and cache_k.shape[-1] % 2 == 0
            and cache_k.is_contiguous() and cache_v.is_contiguous())


def qkv_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor, norms: tuple | None,
               eps: float) -> torch.Tensor:
    """One decode token's q [1, Hq, 1, D], rotated at ``position`` [1] (on the device), after
    which its k (rotated) and v sit in row ``position`` of one layer's caches [1, Hkv, context, D];
    ``norms``: the per-head RMSNorm weights of q and k, or None. One launch instead of six (two
    norms, two rotaries, two cache writes), with the same roundings as :func:`rms_norm` and
    :func:`rotary` (:func:`~dymoe.models.fused_kernels.qkv_decode_kernel`)."""
    kernels = _kernels()
    _, heads, context, d = cache_k.shape
    dv = cache_v.shape[-1]
    hq = q.shape[-1] // d
    out = torch.empty(1, hq, 1, d, dtype=q.dtype, device=q.device)
    q_norm, k_norm = norms if norms is not None else (cos, cos)  # (not read without NORM)
    kernels.qkv_decode_kernel[(hq + heads,)](
        q, k, v, q_norm, k_norm, eps, cos, sin, position, out, cache_k, cache_v, hq, context, D=d, DV=dv,
        BLOCK=kernels.triton.next_power_of_2(d), BLOCK_V=kernels.triton.next_power_of_2(dv),
        NORM=norms is not None, num_warps=4, **chained(q.device))
    return out


def combine_applies(rows: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether :func:`combine` takes expert rows and their router weights: :func:`fused_applies`,
    both bf16 or both float16 (torch's product would promote mixed dtypes)."""
    return rows.dtype in (torch.bfloat16, torch.float16) and weights.dtype == rows.dtype and fused_applies(rows)


COLUMNS = 1024  # columns of H per program of combine and group_plan


def combine(rows: torch.Tensor, weights: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """One token's routed output [1, H] from its k expert rows [k, H] and router weights [k]:
    ``sum_j (rows[i_j] * weights[j])`` in router order j, each product rounded to the rows' dtype
    as torch's is, summed in float32 and rounded once. ``order`` [k] (the sort of the router's
    ids, as grouped GEMMs run them): row i belongs to router slot ``order[i]``; None: rows are in
    router order. One launch (:func:`~dymoe.models.fused_kernels.combine_kernel`)."""
    k, h = rows.shape
    rows = rows if rows.is_contiguous() else rows.contiguous()
    out = torch.empty(1, h, dtype=rows.dtype, device=rows.device)
    kernels = _kernels()
    kernels.combine_kernel[(kernels.triton.cdiv(h, COLUMNS),)](
        rows, weights.contiguous(), order if order is not None else weights, out, h, K=k,
        KB=kernels.triton.next_power_of_2(k), BLOCK=COLUMNS, ORDERED=order is None, num_warps=4,
        **chained(rows.device))
    return out


def group_plan(x: torch.Tensor, ids: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one token x [1, H] routed to ``ids`` [k] of ``experts``: (its k rows [k, H], the
    stable sort ``order`` [k] of the ids (int64, as ``torch.sort(ids)[1]`` for distinct ids), the
    end of each expert's rows [experts] (int32, as ``searchsorted(sorted ids, arange(experts),
    right=True)``)), in one launch (:func:`~dymoe.models.fused_kernels.group_plan_kernel`)."""
    k, h = ids.shape[0], x.shape[-1]
    rows = torch.empty(k, h, dtype=x.dtype, device=x.device)
    order = torch.empty(k, dtype=torch.int64, device=x.device)
    ends = torch.empty(experts, dtype=torch.int32, device=x.device)
    kernels = _kernels()
    kernels.group_plan_kernel[(kernels.triton.cdiv(h, COLUMNS),)](
        ids.contiguous(), x.contiguous(), order, ends, rows, h, experts, K=k, KB=kernels.triton.next_power_of_2(k),
        EB=kernels.triton.next_power_of_2(experts), BLOCK=COLUMNS, num_warps=4, **chained(x.device))
    return rows, order, ends



def decode_attention_applies(q: torch.Tensor) -> bool:
    """Whether :func:`decode_attend` takes one token's q [1, H, 1, D] in the graph decode: the
    ``split`` setting and the fused kernels on, bf16 or float16, and a GPU whose tensor cores
    ``tl.dot`` needs (compute capability 8.0+) or the interpreter."""
    return (ATTENTION == "split" and q.shape[0] == 1 and q.dtype in (torch.bfloat16, torch.float16)
            and fused_applies(q) and (interpreting() or kernels_run_on(q.device))
            and q.shape[1] <= DECODE_COUNTERS and decode_counters(q.device) is not None)


def decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, scale: float,
                  sinks: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """One token's attention over the masked span of a graph decode, split over the keys
    (:mod:`dymoe.models.decode_attention`), with GPT-OSS's sinks and sliding window where given:
    [1, H, 1, DV]."""
    from dymoe.models.decode_attention import decode_attention

    programs = 8 if interpreting() else 2 * sm_count(q.device)
    return decode_attention(q, k, v, index, scale, programs, sinks, window)
