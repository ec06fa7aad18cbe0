"""Triton kernels: one MoE layer's routed experts for a few tokens, read in place from pool slots.

Two launches per layer step, whatever the precision:

1. ``_gate_up_kernel``, grid (experts, I / BLOCK_N): for each expert (a slot's byte offset) and a
   block of its intermediate rows, dequantize gate and up tiles in registers, multiply them with all
   T tokens at once (``tl.dot`` on a [BLOCK_N, BLOCK_K] x [BLOCK_K, 16] tile: tokens are padded to
   16, which costs nothing while the step is bound by reading weights), and write
   ``h[e, t] = combine[t, e] * silu(gate x) * (up x)`` in bf16;
2. ``_down_kernel``, grid (experts, H / BLOCK_N): ``partial[e, t] = down_e h[e, t]`` in float32.

The caller sums ``partial`` over experts with one ``sum(0)``: a fixed order, so the result is
deterministic (atomics in the second kernel would make it depend on scheduling). Each expert's
weights are read once for all tokens. An expert whose routing column is all zero reads nothing
(its loops run zero times), which is how duplicated slots are skipped without a host sync.

Dequantization is folded into the product rather than done weight by weight: codes (exact small
integers in bf16) go through the bf16 tensor cores with float32 accumulation, and a group's scale
and min are applied to its partial dot product (see ``_accumulate``). That is the reference's
``code * scale + min`` in float32 without ever rounding a weight, and fewer instructions per weight.
"""


import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dymoe.quant.kernels.plan import KernelPlan, Projection

TOKEN_BLOCK = 16  # tl.dot's smallest N; the decode path takes up to this many tokens per launch


@triton.jit
def _code_tile(w_ptr, w_base, rows, row_ok, k0, ROW: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr,
               CPW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] stored values of weight ``rows``, input columns ``k0 .. k0+BLOCK_K`` (zero
    outside the stored columns): bf16 weights, int8 codes, or the unsigned codes of a group format."""
    if BITS >= 8:
        k = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (k[None, :] < KP)
        return tl.load(w_ptr + w_base + rows[:, None] * ROW + k[None, :], mask=mask, other=0)
    j = k0 // CPW + tl.arange(0, BLOCK_K // CPW)
    mask = row_ok[:, None] & (j[None, :] < KP // CPW)
    if BITS == 3:
        # 8 codes in 3 bytes: assemble the 24-bit word, then shift like the 32-bit formats
        p = w_ptr + w_base + rows[:, None] * ROW + 3 * j[None, :]
        words = (tl.load(p, mask=mask, other=0).to(tl.int32)
                 | (tl.load(p + 1, mask=mask, other=0).to(tl.int32) << 8)
                 | (tl.load(p + 2, mask=mask, other=0).to(tl.int32) << 16))
    else:
        words = tl.load(w_ptr + w_base + rows[:, None] * ROW + j[None, :], mask=mask, other=0)
    shifts = tl.arange(0, CPW) * BITS
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _accumulate(acc, w_ptr, s_ptr, w_base, s_base, m_base, rows, row_ok, k0, xt, xsum,
                ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                CPW: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc`` [BLOCK_N, T] plus this K-block of ``W xt``. A group format's block is one group, so
    ``sum_k (code*s + m) x = s * (codes . x) + m * sum_k x``: the codes are exact bf16 integers and
    the weights are never rounded (rounding them to bf16 costs ~1e-2 relative error where a group's
    min is large next to its spread). int8's per-row scale is applied once, after the loop."""
    codes = _code_tile(w_ptr, w_base, rows, row_ok, k0, ROW, KP, BITS, CPW, BLOCK_N, BLOCK_K)
    if BITS >= 8:
        return tl.dot(_operand(codes, F32_DOT), xt, acc)
    g = k0 // BLOCK_K
    s = tl.load(s_ptr + s_base + rows * GROUPS + g, mask=row_ok, other=0).to(tl.float32)
    m = tl.load(s_ptr + m_base + rows * GROUPS + g, mask=row_ok, other=0).to(tl.float32)
    dots = tl.dot(_operand(codes, F32_DOT), xt)
    return acc + s[:, None] * dots + m[:, None] * xsum[None, :]


@triton.jit
def _operand(v, F32_DOT: tl.constexpr):
    """``v`` (bf16 values or small integer codes, so exact in bf16) as a ``tl.dot`` operand: bf16
    on the GPU; float32 under the interpreter, whose bf16 arithmetic and int-to-bf16 casts are
    wrong (Triton 3.9 on numpy)."""
    if F32_DOT:
        return v.to(tl.float32)
    return v.to(tl.bfloat16)


@triton.jit
def _row_scales(s_ptr, s_base, rows, row_ok, BITS: tl.constexpr):
    """int8's per-row scales (ones for the other formats, whose scales are inside the tile)."""
    if BITS == 8:
        return tl.load(s_ptr + s_base + rows, mask=row_ok, other=0).to(tl.float32)
    return tl.full(rows.shape, 1.0, tl.float32)


@triton.jit
def _routing_column(combine_ptr, e, T, E, BLOCK_T: tl.constexpr):
    t = tl.arange(0, BLOCK_T)
    c = tl.load(combine_ptr + t * E + e, mask=t < T, other=0.0)
    return t, c, tl.max(tl.abs(c), axis=0) > 0


@triton.jit
def _gate_up_kernel(w_ptr, s_ptr, offsets_ptr, combine_ptr, x_ptr, h_ptr, T, E,
                    H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                    GATE_W: tl.constexpr, GATE_S: tl.constexpr, GATE_M: tl.constexpr,
                    UP_W: tl.constexpr, UP_S: tl.constexpr, UP_M: tl.constexpr,
                    ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                    CPW: tl.constexpr, F32_DOT: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < I
    t, c, active = _routing_column(combine_ptr, e, T, E, BLOCK_T)
    slot = tl.load(offsets_ptr + e)
    w_slot = slot // W_BYTES
    s_slot = slot // 2
    acc_g = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, tl.where(active, KP, 0), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + t[None, :] * H + k[:, None], mask=(k[:, None] < H) & (t[None, :] < T), other=0.0)
        xt = _operand(xt, F32_DOT)
        xsum = tl.sum(xt.to(tl.float32), axis=0)
        acc_g = _accumulate(acc_g, w_ptr, s_ptr, w_slot + GATE_W, s_slot + GATE_S, s_slot + GATE_M, rows, row_ok,
                            k0, xt, xsum, ROW, KP, GROUPS, BITS, CPW, F32_DOT, BLOCK_N, BLOCK_K)
        acc_u = _accumulate(acc_u, w_ptr, s_ptr, w_slot + UP_W, s_slot + UP_S, s_slot + UP_M, rows, row_ok,
                            k0, xt, xsum, ROW, KP, GROUPS, BITS, CPW, F32_DOT, BLOCK_N, BLOCK_K)
    acc_g = acc_g * _row_scales(s_ptr, s_slot + GATE_S, rows, row_ok, BITS)[:, None]
    acc_u = acc_u * _row_scales(s_ptr, s_slot + UP_S, rows, row_ok, BITS)[:, None]
    h = acc_g * tl.sigmoid(acc_g) * acc_u * c[None, :]
    mask = row_ok[:, None] & (t[None, :] < T)
    tl.store(h_ptr + (e * T + t[None, :]) * I + rows[:, None], h.to(tl.bfloat16), mask=mask)


@triton.jit
def _down_kernel(w_ptr, s_ptr, offsets_ptr, combine_ptr, h_ptr, partial_ptr, T, E,
                 H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                 DOWN_W: tl.constexpr, DOWN_S: tl.constexpr, DOWN_M: tl.constexpr,
                 ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                 CPW: tl.constexpr, F32_DOT: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < H
    t, c, active = _routing_column(combine_ptr, e, T, E, BLOCK_T)
    slot = tl.load(offsets_ptr + e)
    w_slot = slot // W_BYTES
    s_slot = slot // 2
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, tl.where(active, KP, 0), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ht = tl.load(h_ptr + (e * T + t[None, :]) * I + k[:, None], mask=(k[:, None] < I) & (t[None, :] < T),
                     other=0.0)
        ht = _operand(ht, F32_DOT)
        acc = _accumulate(acc, w_ptr, s_ptr, w_slot + DOWN_W, s_slot + DOWN_S, s_slot + DOWN_M, rows, row_ok, k0,
                          ht, tl.sum(ht.to(tl.float32), axis=0), ROW, KP, GROUPS, BITS, CPW, F32_DOT, BLOCK_N,
                          BLOCK_K)
    acc = acc * _row_scales(s_ptr, s_slot + DOWN_S, rows, row_ok, BITS)[:, None]
    mask = row_ok[:, None] & (t[None, :] < T)
    tl.store(partial_ptr + (e * T + t[None, :]) * H + rows[:, None], acc, mask=mask)


# ---- launching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one kernel launch (BLOCK_K is rounded up to a whole number of groups)."""

    block_n: int = 16
    block_k: int = 128  # bf16 and int8; a group format's block is one group
    num_warps: int = 4
    num_stages: int = 3


def choose_config(plan: KernelPlan, rows: int, experts: int, sms: int) -> LaunchConfig:
    """Tiles for ``experts`` x ``rows`` output rows: the widest row block that still gives every SM
    at least two blocks (a decode step is bound by how many bytes are in flight, so parallelism
    comes first)."""
    block_n = 16
    for candidate in (64, 32):
        if experts * triton.cdiv(rows, candidate) >= 2 * sms:
            block_n = candidate
            break
    return LaunchConfig(block_n=block_n)


def _block_k(plan: KernelPlan, config: LaunchConfig) -> int:
    return plan.group_size if plan.group_size else config.block_k


def _format_args(plan: KernelPlan, proj: Projection) -> dict:
    cpw = {4: 8, 3: 8, 2: 16}.get(plan.bits, 1)
    return dict(ROW=proj.row_elems, KP=proj.padded_cols, GROUPS=max(proj.padded_cols // max(plan.group_size, 1), 1),
                BITS=plan.bits, CPW=cpw, W_BYTES=plan.payload_elem_bytes,
                F32_DOT=os.environ.get("TRITON_INTERPRET") == "1")


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any count gives the same result
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_decode(pool: torch.Tensor, slot_offsets: torch.Tensor, plan: KernelPlan, x: torch.Tensor,
                  combine: torch.Tensor, gate_up_config: LaunchConfig | None = None,
                  down_config: LaunchConfig | None = None) -> torch.Tensor:
    """The Triton path of :func:`dymoe.quant.kernels.expert_decode` (same arguments and result)."""
    t, e = combine.shape
    if t > TOKEN_BLOCK:
        raise ValueError(f"the decode kernels take at most {TOKEN_BLOCK} tokens per launch, got {t}")
    h_size, i_size = plan.hidden_size, plan.intermediate_size
    payload, scales = pool.view(plan.payload_dtype), pool.view(torch.float16)
    x = x.contiguous()
    combine = combine.contiguous()
    sms = _sm_count(pool.device)
    hidden = torch.empty(e, t, i_size, dtype=torch.bfloat16, device=x.device)
    partial = torch.empty(e, t, h_size, dtype=torch.float32, device=x.device)

    cfg = gate_up_config or choose_config(plan, i_size, e, sms)
    gate, up = plan.gate, plan.up
    _gate_up_kernel[(e, triton.cdiv(i_size, cfg.block_n))](
        payload, scales, slot_offsets, combine, x, hidden, t, e, H=h_size, I=i_size,
        GATE_W=gate.weight, GATE_S=gate.scales, GATE_M=gate.mins, UP_W=up.weight, UP_S=up.scales, UP_M=up.mins,
        **_format_args(plan, gate), BLOCK_T=TOKEN_BLOCK, BLOCK_N=cfg.block_n, BLOCK_K=_block_k(plan, cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = down_config or choose_config(plan, h_size, e, sms)
    down = plan.down
    _down_kernel[(e, triton.cdiv(h_size, cfg.block_n))](
        payload, scales, slot_offsets, combine, hidden, partial, t, e, H=h_size, I=i_size,
        DOWN_W=down.weight, DOWN_S=down.scales, DOWN_M=down.mins,
        **_format_args(plan, down), BLOCK_T=TOKEN_BLOCK, BLOCK_N=cfg.block_n, BLOCK_K=_block_k(plan, cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return partial.sum(0).to(x.dtype)
