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


import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # the GPU's nanosecond clock and SM id, for the traced split-K step (launch_decode(trace=))
    from triton.language.extra.cuda import globaltimer, smid
except ImportError:
    globaltimer = smid = None

from dymoe.env import env_override
from dymoe.quant.kernels import sm_count
from dymoe.models.expert_math import SWIGLU, ExpertMath
from dymoe.quant.kernels import interpreting
from dymoe.quant.kernels.plan import KernelPlan, Projection

TOKEN_BLOCK = 16  # tl.dot's smallest N; the decode path takes up to this many tokens per launch
ACTIVATION_CODES = {"silu": 0, "gpt_oss": 1}  # ExpertMath.activation -> the kernels' ACT constexpr


@triton.jit
def _unit_tile(w_ptr, w_base, rows, row_ok, k0, ROW: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr,
               CPW: tl.constexpr, SUB_K: tl.constexpr):
    """[BLOCK_N, SUB_K // CPW] packing units of weight ``rows`` from input column ``k0`` (zero outside
    the stored columns): bf16 values (CPW 1), 32-bit words of CPW codes, or int3's 24-bit words of 8
    codes assembled from 3 bytes."""
    j = k0 // CPW + tl.arange(0, SUB_K // CPW)
    mask = row_ok[:, None] & (j[None, :] < KP // CPW)
    if BITS == 3:
        p = w_ptr + w_base + rows[:, None] * ROW + 3 * j[None, :]
        units = (tl.load(p, mask=mask, other=0).to(tl.int32)
                 | (tl.load(p + 1, mask=mask, other=0).to(tl.int32) << 8)
                 | (tl.load(p + 2, mask=mask, other=0).to(tl.int32) << 16))
    else:
        units = tl.load(w_ptr + w_base + rows[:, None] * ROW + j[None, :], mask=mask, other=0)
    return units


@triton.jit
def _code_tile(w_ptr, w_base, rows, row_ok, k0, ROW: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr,
               CPW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] stored values of weight ``rows``, input columns ``k0 .. k0+BLOCK_K``: bf16
    weights, or integer codes (int8 signed, the others unsigned), for ``tl.dot``."""
    # constexpr branches each assign the result: Triton compiles the code after a returning branch
    # too, so there are no early returns in these helpers
    units = _unit_tile(w_ptr, w_base, rows, row_ok, k0, ROW, KP, BITS, CPW, BLOCK_K)
    if BITS == 16:
        tile = units
    else:
        shifts = tl.arange(0, CPW) * BITS
        codes = (units[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        if BITS == 8:
            codes = codes - ((codes >> 7) << 8)  # two's complement byte
        tile = tl.reshape(codes, (BLOCK_N, BLOCK_K))
    return tile


@triton.jit
def _code_value(units, j: tl.constexpr, BITS: tl.constexpr):
    """Code ``j`` of each packing unit (uint32; int8's bytes XOR-ed with 0x80) as an exact float32,
    int8 signed and the others unsigned, in three instructions per code and no int-to-float
    conversion (a quarter-rate instruction on sm_90 that would bound the step by arithmetic):

    a code at bits ``low .. low+BITS`` of a unit is OR-ed in place into the mantissa of
    ``2**(23 - low)`` (one LOP3), which makes the float ``2**(23 - low) + code``; one FADD takes the
    power of two (and int8's bias of 128) off, one FFMA uses it. A code must end below bit 23, so
    codes past that are first shifted down (one shift per unit, shared by the codes above it)."""
    PER: tl.constexpr = 23 // BITS  # codes per 23-bit mantissa
    low: tl.constexpr = (j % PER) * BITS
    piece = units >> ((j // PER) * PER * BITS)
    magic: tl.constexpr = (150 - low) << 23  # the float 2**(23 - low)
    f = ((piece & (((1 << BITS) - 1) << low)) | magic).to(tl.float32, bitcast=True)
    if BITS == 8:
        v = f - ((1 << (23 - low)) + 128.0)
    else:
        v = f - (1 << (23 - low))
    return v


@triton.jit
def _gemv_step(acc, acc_m, w_ptr, s_ptr, w_base, s_base, m_base, rows, row_ok, k0, a_ptr, a_cols,
               ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr, CPW: tl.constexpr,
               SUB_K: tl.constexpr):
    """One token: ``acc`` [BLOCK_N, SUB_K // CPW] (per packing unit, reduced once after the loop) and
    ``acc_m`` [BLOCK_N] (the mins' term) plus ``W[rows, k0:k0+SUB_K] . a[k0:k0+SUB_K]``.

    The codes stay in their packing units as a [BLOCK_N, units, CPW] tensor and the activations are
    loaded in the same [units, CPW] order, so no weight tile changes layout (the ``tl.dot`` path's
    reshape and operand shuffles of the whole tile through shared memory are what held low-bit
    decode to ~10% of the copy bandwidth); the product is CUDA-core FMAs. A group format's
    sub-block is one group: ``s * (codes . a) + m * sum(a)``, as in :func:`_accumulate`."""
    units = _unit_tile(w_ptr, w_base, rows, row_ok, k0, ROW, KP, BITS, CPW, SUB_K).to(tl.uint32, bitcast=True)
    if BITS == 8:
        units = units ^ 0x80808080  # signed bytes to codes biased by 128
    k = k0 + tl.arange(0, SUB_K // CPW) * CPW  # each unit's first column
    part = tl.zeros(units.shape, dtype=tl.float32)
    asum = tl.zeros(k.shape, dtype=tl.float32)
    for j in tl.static_range(CPW):
        a = tl.load(a_ptr + k + j, mask=k + j < a_cols, other=0.0).to(tl.float32)
        part += _code_value(units, j, BITS) * a[None, :]
        asum += a
    return _group_terms(acc, acc_m, part, asum, s_ptr, s_base, m_base, rows, row_ok, k0, GROUPS, BITS, SUB_K)


@triton.jit
def _group_scale(s_ptr, s_base, m_base, rows, row_ok, k0, GROUPS: tl.constexpr, SUB_K: tl.constexpr):
    """The scale and min of rows ``rows`` for the group at column ``k0`` (a step of ``SUB_K`` columns is one group)."""
    g = k0 // SUB_K + rows * 0  # as a tensor: the interpreter rejects a scalar mask term
    smask = row_ok & (g < GROUPS)
    s = tl.load(s_ptr + s_base + rows * GROUPS + g, mask=smask, other=0).to(tl.float32)
    m = tl.load(s_ptr + m_base + rows * GROUPS + g, mask=smask, other=0).to(tl.float32)
    return s, m


@triton.jit
def _group_terms(acc, acc_m, part, asum, s_ptr, s_base, m_base, rows, row_ok, k0, GROUPS: tl.constexpr,
                 BITS: tl.constexpr, SUB_K: tl.constexpr):
    """``acc += s * part`` and ``acc_m += m * sum(a)`` for one group (a group format's sub-block is
    one group); formats without groups add ``part`` as is (int8's row scale comes after the loop)."""
    if BITS >= 8:
        acc = acc + part
    else:
        s, m = _group_scale(s_ptr, s_base, m_base, rows, row_ok, k0, GROUPS, SUB_K)
        acc = acc + s[:, None] * part
        acc_m = acc_m + m * tl.sum(asum, axis=0)
    return acc, acc_m


@triton.jit
def _operand(v, F32_DOT: tl.constexpr):
    """``v`` (bf16 values or small integer codes, so exact in bf16) as a ``tl.dot`` operand: bf16
    on the GPU; float32 under the interpreter, whose bf16 arithmetic and int-to-bf16 casts are
    wrong (Triton 3.9 on numpy)."""
    if F32_DOT:
        v = v.to(tl.float32)
    else:
        v = v.to(tl.bfloat16)
    return v


@triton.jit
def _accumulate(acc, w_ptr, s_ptr, w_base, s_base, m_base, rows, row_ok, k0, a_ptr, a_row, a_cols, t, t_ok,
                ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                CPW: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr):
    """``acc`` [BLOCK_N, T] plus ``W[rows, k0:k0+SUB_K] @ A[k0:k0+SUB_K, :T]`` where activation
    ``A[k, t] = a_ptr[t * a_row + k]`` (zero for ``k >= a_cols``).

    A group format's sub-block is one group, so ``sum_k (code*s + m) a = s * (codes . a) + m * sum_k a``:
    the codes are exact bf16 integers and no weight is ever rounded (rounding dequantized weights to
    bf16 costs up to ~1e-2 relative error where a group's min is large next to its spread), and it
    costs fewer instructions per weight. int8's per-row scale is applied after the loop."""
    k = k0 + tl.arange(0, SUB_K)
    a = tl.load(a_ptr + t[None, :] * a_row + k[:, None],
                mask=(k[:, None] < a_cols) & t_ok[None, :], other=0.0)
    a = _operand(a, F32_DOT)
    codes = _code_tile(w_ptr, w_base, rows, row_ok, k0, ROW, KP, BITS, CPW, BLOCK_N, SUB_K)
    if BITS >= 8:
        acc = tl.dot(_operand(codes, F32_DOT), a, acc)
    else:
        s, m = _group_scale(s_ptr, s_base, m_base, rows, row_ok, k0, GROUPS, SUB_K)
        asum = tl.sum(a.to(tl.float32), axis=0)
        acc = acc + s[:, None] * tl.dot(_operand(codes, F32_DOT), a) + m[:, None] * asum[None, :]
    return acc


@triton.jit
def _row_scales(s_ptr, s_base, rows, row_ok, BITS: tl.constexpr):
    """int8's per-row scales (ones for the other formats, whose scales are applied per group)."""
    if BITS == 8:
        scales = tl.load(s_ptr + s_base + rows, mask=row_ok, other=0).to(tl.float32)
    else:
        scales = tl.full(rows.shape, 1.0, tl.float32)
    return scales


@triton.jit
def _bias(s_ptr, s_slot, OFFSET: tl.constexpr, rows, row_ok):
    """bf16 biases of ``rows`` stored at fp16-view element ``OFFSET`` of the slot, as float32 (read
    through the fp16 view as raw bits); zeros for experts without biases (``OFFSET`` -1)."""
    if OFFSET >= 0:
        bits = tl.load(s_ptr + s_slot + OFFSET + rows, mask=row_ok, other=0).to(tl.int16, bitcast=True)
        b = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        b = tl.zeros(rows.shape, dtype=tl.float32)
    return b


@triton.jit
def _glu(gate, up, ACT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr):
    """The expert activation of :mod:`dymoe.models.expert_math`: SwiGLU (``ACT`` 0), or GPT-OSS's
    (1): gate clamped from above and up on both sides at ``LIMIT``, ``(up + 1) * gate * sigmoid(ALPHA * gate)``."""
    if ACT == 1:
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        out = (up + 1.0) * (gate * tl.sigmoid(gate * ALPHA))
    else:
        out = gate * tl.sigmoid(gate) * up
    return out


@triton.jit
def _live(rows, row_ok, active):
    """The rows whose per-row data (int8 scales, biases) a program may read: none for an expert no
    token uses, whose slot may be a padded column's filler holding any bytes (multiplying a NaN
    read from it by a zero weight would still give NaN). ``active`` is a scalar; the interpreter
    wants it as a tensor of the rows' shape."""
    return row_ok & ((rows * 0 + active.to(tl.int32)) > 0)


@triton.jit
def _expert_slot(offsets_ptr, ids_ptr, combine_ptr, e, T, E, W_BYTES: tl.constexpr, BLOCK_T: tl.constexpr,
                 INDIRECT: tl.constexpr):
    """Expert e's slot base in payload-view and fp16 elements, its routing column [BLOCK_T] (read
    in float32 whatever its dtype), and how many input columns to read (0 when no token uses it).
    The slot's byte offset is ``offsets[e]``, or with INDIRECT ``offsets[ids[e]]`` (a table of
    every slot's offset, indexed by the token's slot ids: no lookup launch before the step)."""
    t = tl.arange(0, BLOCK_T)
    c = tl.load(combine_ptr + t * E + e, mask=t < T, other=0.0).to(tl.float32)
    if INDIRECT:
        slot = tl.load(offsets_ptr + tl.load(ids_ptr + e))
    else:
        slot = tl.load(offsets_ptr + e)
    w_slot = tl.multiple_of(slot // W_BYTES, 64)  # slots are 256-byte aligned (SlotPool.ALIGN)
    s_slot = tl.multiple_of(slot // 2, 128)
    return w_slot, s_slot, t, c, tl.max(tl.abs(c), axis=0) > 0


@triton.jit
def _gate_up_kernel(w_ptr, s_ptr, offsets_ptr, ids_ptr, combine_ptr, x_ptr, h_ptr, T, E,
                    H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                    GATE_W: tl.constexpr, GATE_S: tl.constexpr, GATE_M: tl.constexpr,
                    UP_W: tl.constexpr, UP_S: tl.constexpr, UP_M: tl.constexpr,
                    ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                    CPW: tl.constexpr, F32_DOT: tl.constexpr, GEMV: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, SUBS: tl.constexpr, GU_BIAS: tl.constexpr = -1,
                    ACT: tl.constexpr = 0, LIMIT: tl.constexpr = 7.0, ALPHA: tl.constexpr = 1.702,
                    INDIRECT: tl.constexpr = False):
    e = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < I
    w_slot, s_slot, t, c, active = _expert_slot(offsets_ptr, ids_ptr, combine_ptr, e, T, E, W_BYTES, BLOCK_T, INDIRECT)
    live = _live(rows, row_ok, active)
    t_ok = t < T
    gate_w, gate_s, gate_m = w_slot + GATE_W, s_slot + GATE_S, s_slot + GATE_M
    up_w, up_s, up_m = w_slot + UP_W, s_slot + UP_S, s_slot + UP_M
    if GEMV:  # one token: CUDA-core FMAs on the packed codes
        acc_g = tl.zeros((BLOCK_N, SUB_K // CPW), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, SUB_K // CPW), dtype=tl.float32)
        m_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        m_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, tl.where(active, KP, 0), SUB_K * SUBS):
            for sub in tl.static_range(SUBS):  # several groups per step: more bytes in flight per block
                k = k0 + sub * SUB_K
                acc_g, m_g = _gemv_step(acc_g, m_g, w_ptr, s_ptr, gate_w, gate_s, gate_m, rows, row_ok, k,
                                        x_ptr, H, ROW, KP, GROUPS, BITS, CPW, SUB_K)
                acc_u, m_u = _gemv_step(acc_u, m_u, w_ptr, s_ptr, up_w, up_s, up_m, rows, row_ok, k,
                                        x_ptr, H, ROW, KP, GROUPS, BITS, CPW, SUB_K)
        out_g = (tl.sum(acc_g, axis=1) + m_g)[:, None]
        out_u = (tl.sum(acc_u, axis=1) + m_u)[:, None]
    else:  # several tokens: tensor cores
        out_g = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        out_u = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for k0 in range(0, tl.where(active, KP, 0), SUB_K * SUBS):
            for sub in tl.static_range(SUBS):
                k = k0 + sub * SUB_K
                out_g = _accumulate(out_g, w_ptr, s_ptr, gate_w, gate_s, gate_m, rows, row_ok, k, x_ptr, H, H,
                                    t, t_ok, ROW, KP, GROUPS, BITS, CPW, F32_DOT, BLOCK_N, SUB_K)
                out_u = _accumulate(out_u, w_ptr, s_ptr, up_w, up_s, up_m, rows, row_ok, k, x_ptr, H, H,
                                    t, t_ok, ROW, KP, GROUPS, BITS, CPW, F32_DOT, BLOCK_N, SUB_K)
    out_g = out_g * _row_scales(s_ptr, gate_s, rows, live, BITS)[:, None]
    out_u = out_u * _row_scales(s_ptr, up_s, rows, live, BITS)[:, None]
    out_g += _bias(s_ptr, s_slot, GU_BIAS, rows, live)[:, None]
    out_u += _bias(s_ptr, s_slot, GU_BIAS, rows + I, live)[:, None]  # up's biases follow gate's
    h = _glu(out_g, out_u, ACT, LIMIT, ALPHA) * c[None, :]
    tl.store(h_ptr + (e * T + t[None, :]) * I + rows[:, None], h.to(tl.bfloat16), mask=row_ok[:, None] & t_ok[None, :])


@triton.jit
def _down_kernel(w_ptr, s_ptr, offsets_ptr, ids_ptr, combine_ptr, h_ptr, partial_ptr, out_ptr, counters_ptr, T, E,
                 H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                 DOWN_W: tl.constexpr, DOWN_S: tl.constexpr, DOWN_M: tl.constexpr,
                 ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                 CPW: tl.constexpr, F32_DOT: tl.constexpr, GEMV: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, SUBS: tl.constexpr, D_BIAS: tl.constexpr = -1,
                 INDIRECT: tl.constexpr = False):
    e = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < H
    w_slot, s_slot, t, c, active = _expert_slot(offsets_ptr, ids_ptr, combine_ptr, e, T, E, W_BYTES, BLOCK_T, INDIRECT)
    live = _live(rows, row_ok, active)
    t_ok = t < T
    down_w, down_s, down_m = w_slot + DOWN_W, s_slot + DOWN_S, s_slot + DOWN_M
    if GEMV:
        acc = tl.zeros((BLOCK_N, SUB_K // CPW), dtype=tl.float32)
        acc_m = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, tl.where(active, KP, 0), SUB_K * SUBS):
            for sub in tl.static_range(SUBS):
                acc, acc_m = _gemv_step(acc, acc_m, w_ptr, s_ptr, down_w, down_s, down_m, rows, row_ok,
                                        k0 + sub * SUB_K, h_ptr + e * T * I, I, ROW, KP, GROUPS, BITS, CPW, SUB_K)
        out = (tl.sum(acc, axis=1) + acc_m)[:, None]
    else:
        out = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for k0 in range(0, tl.where(active, KP, 0), SUB_K * SUBS):
            for sub in tl.static_range(SUBS):
                out = _accumulate(out, w_ptr, s_ptr, down_w, down_s, down_m, rows, row_ok, k0 + sub * SUB_K,
                                  h_ptr + e * T * I, I, I, t, t_ok, ROW, KP, GROUPS, BITS, CPW, F32_DOT, BLOCK_N,
                                  SUB_K)
    out = out * _row_scales(s_ptr, down_s, rows, live, BITS)[:, None]
    if D_BIAS >= 0:  # each token's router weight times the expert's bias (h already carries the weight)
        out += _bias(s_ptr, s_slot, D_BIAS, rows, live)[:, None] * c[None, :]
    mask = row_ok[:, None] & t_ok[None, :]
    tl.store(partial_ptr + (e * T + t[None, :]) * H + rows[:, None], out, mask=mask)
    _sum_experts(partial_ptr, out_ptr, counters_ptr + tl.program_id(1), rows, t, mask, T, E, H, BLOCK_N, BLOCK_T)


SUM_UNROLL: tl.constexpr = tl.constexpr(8)  # partials loaded together by _sum_experts


@triton.jit
def _sum_experts(partial_ptr, out_ptr, counter_ptr, rows, t, mask, T, E, H: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_T: tl.constexpr, TRACE: tl.constexpr = False, trace_ptr=None):
    """The last of a row block's E programs to finish sums the E partials in expert order and writes
    the result: one launch fewer than a separate sum, and still deterministic (the order of the sum
    does not depend on which program comes last). The counter is left at zero for the next step."""
    tl.debug_barrier()  # every thread's partial store happens before the release below
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if TRACE:  # the split-K step traced (split_k.TRACE_FIELDS): when the counter's atomic returned
        tl.store(trace_ptr + 3, globaltimer())
    if arrived == E - 1:
        total = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for e0 in range(0, E, SUM_UNROLL):  # unrolled: SUM_UNROLL partials' loads in flight at once
            for i in tl.static_range(SUM_UNROLL):
                ok = e0 + i < E
                part = tl.load(partial_ptr + ((e0 + i) * T + t[None, :]) * H + rows[:, None], mask=mask & ok,
                               other=0.0, cache_modifier=".cg")  # from L2: this SM's L1 may hold stale lines
                total = tl.where(ok, total + part, total)  # expert order, past E nothing added (not even 0.0)
        tl.store(out_ptr + t[None, :] * H + rows[:, None], total.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(counter_ptr, 0)  # every program has counted: a plain store, no round trip to wait for
        if TRACE:
            tl.store(trace_ptr + 4, globaltimer())


# ---- launching ---------------------------------------------------------------------------------

MAX_SPLIT = 16  # K slices a split-K launch may use (sizes the workspace's split scratch)
PACK_BLOCK = 1024  # values per program of the packed (int4/int3/int2) path's input packing launch
PACK_WARPS = 4  # its warps (the router packs with as many, so that both sum a chunk in one order)
PACKED_BITS = (4, 3, 2)


def _packed_override() -> bool | None:
    """DYMOE_PACKED_DECODE from the environment: 1 runs every one-token int4/int3/int2 step on
    packed activation vectors, 0 none, unset leaves it to :func:`packs_by_default`."""
    return env_override("DYMOE_PACKED_DECODE", "packed float16 path on", "off")


PACKED_OVERRIDE = _packed_override()


def _pdl_override() -> bool | None:
    """DYMOE_PDL from the environment, for split_config: 1 turns on programmatic dependent launch
    (``LaunchConfig.pdl``) for every split-K step, 0 turns it off, unset leaves it to
    :func:`pdl_by_default`."""
    return env_override("DYMOE_PDL", "programmatic dependent launch for every step",
                        "off; unset: on for small expert shapes")


PDL_MAX_WEIGHTS = 1 << 22  # weights of one expert projection (H x I) up to which pdl is the default


def pdl_by_default(plan: KernelPlan) -> bool:
    """Whether a split-K step of ``plan`` uses programmatic dependent launch unless DYMOE_PDL says
    otherwise: where one projection has at most PDL_MAX_WEIGHTS weights, i.e. the short steps,
    whose launch gaps are a large part of the step. Measured on an H100 (2026-12-06, % of copy,
    block steps without -> with pdl; kernel_variants_int2g64_h100.json and
    kernel_variants_olmoe_deepseek_h100.json): Qwen3-30B-A3B (2048 x 768) int4 37 -> 41, int8
    52 -> 54, int3 and int2/g128 equal; OLMoE (2048 x 1024) +1 to +4 in all seven formats;
    DeepSeek-V2-Lite (2048 x 1408) int8 54 -> 56, int4/g128 44 -> 47. On Mixtral-8x7B (4096 x
    14336) it went from +1 (int8, int4) to -5 (int2/g128), so long steps keep it off."""
    return plan.hidden_size * plan.intermediate_size <= PDL_MAX_WEIGHTS


PDL_OVERRIDE = _pdl_override()


def _early_step() -> bool:
    return env_override("DYMOE_EARLY_STEP", "a pdl step's first launch starts while the launch before it (the "
                        "router) finishes, and waits for it before reading anything, the default",
                        "it starts after the launch before has ended") is not False


EARLY_STEP = _early_step()


def _one_launch_override() -> bool | None:
    """DYMOE_ONE_LAUNCH from the environment, for split_config: 1 runs every split-K step as one
    launch (``LaunchConfig.one_launch``), 0 none, unset leaves it to :func:`one_launch_by_default`."""
    return env_override("DYMOE_ONE_LAUNCH", "every one-token low-bit step in one launch",
                        "off; unset: on for long int8, int4 and int2/g64 steps")


ONE_LAUNCH_OVERRIDE = _one_launch_override()


def one_launch_by_default(plan: KernelPlan) -> bool:
    """Whether a split-K step of ``plan`` runs as one launch unless DYMOE_ONE_LAUNCH says otherwise:
    the long steps (more than PDL_MAX_WEIGHTS weights per projection, where pdl is off) of int8,
    int4 and int2/g64. Measured on an H100 (2026-12-06, 20-step graphs, one call, after the
    unrolled partial sums; docs/results/launch_forms_h100.json and launch_forms_variants_h100.json),
    Mixtral-8x7B (4096 x 14336), microseconds apart -> one launch: int8 140.3 -> 127.3, int4/g128
    113.1 -> 89.4, int4/g64 142.6 -> 104.7, int2/g64 84.0 -> 71.4; slower: int2/g128 78.3 -> 97.0,
    int3/g128 158.8 -> 194.5 and int3/g64 197.0 -> 223.1 (the down items waiting on a slow gate_up
    hold their SMs). On the short steps of Qwen3-30B-A3B, OLMoE and DeepSeek-V2-Lite one launch
    was as fast at best (OLMoE int8 29.7 -> 28.1) and mostly slower (Qwen3 int4/g128 14.2 -> 15.7
    with preload both ways), so those keep pdl's three launches."""
    return not pdl_by_default(plan) and (plan.bits in (8, 4) or (plan.bits, plan.group_size) == (2, 64))


def preload_by_default(plan: KernelPlan) -> bool:
    """Whether each program of a split-K step loads its first step of weights before it waits for
    its activations (``LaunchConfig.preload``): int4, and int8 and int3 on the short steps (where
    pdl is on). Measured on an H100 (2026-12-06, 20-step graphs, one call; docs/results/
    launch_forms_h100.json), microseconds without -> with: Qwen3-30B-A3B int8 20.8 -> 18.7,
    int4/g128 14.6 -> 14.2, int3/g128 22.8 -> 18.6; OLMoE int4/g128 15.8 -> 15.0; DeepSeek-V2-Lite
    int4/g128 17.5 -> 17.0; Mixtral-8x7B in one launch int4/g128 89.4 -> 87.6, int4/g64
    104.7 -> 101.2, int8 127.3 -> 126.9 (no gain, and apart, with DYMOE_ONE_LAUNCH=0, 140.3 -> 155.9:
    so long int8 steps keep it off). Slower: int2 (Qwen3 11.9 -> 12.2, OLMoE 13.5 -> 13.9, its
    steps are bound by arithmetic) and Mixtral's int3 apart (158.8 -> 169.0)."""
    return plan.bits == 4 or (plan.bits in (8, 3) and pdl_by_default(plan))


def packs_by_default(plan: KernelPlan) -> bool:
    """Whether a one-token step of ``plan`` runs on packed activation vectors (split_k._packed_step)
    unless DYMOE_PACKED_DECODE says otherwise: int2, int3 and int4 wherever a group holds whole
    chunks. Measured on an H100 (2026-12-06, % of copy, float32 split-K -> packed in block steps;
    docs/results/kernel_variants_packed_h100.json, kernel_variants_pdl_h100.json and
    kernel_variants_int2g64_h100.json): int3 7-11% (tiled) -> 24-28%; int4/g128 35-50% -> 37-54%;
    int4/g64 35-42% -> 37-45%; int2/g128 14-24% -> 20-42%; int2/g64 18-22% -> 26-49% (per group,
    before block steps, it measured 19-20%: why it was the last to switch)."""
    if plan.bits not in PACKED_BITS or plan.group_size % chunk_values(plan.bits):
        return False  # (a group of fewer values than a chunk: no packed path, see runs_packed)
    return PACKED_OVERRIDE is not False


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles of one kernel launch: ``block_n`` output rows per block, ``block_k`` input columns per
    pipelined step (a group format's step is ``block_k / group_size`` groups, at least one).
    ``split_k``: None runs the tiled kernels (each block reads whole rows); a number runs the
    one-token split-K kernels of :mod:`dymoe.quant.kernels.split_k` with up to that many K slices
    (fewer when K has fewer ``block_k`` steps). ``packed``: their int4, int3 and int2 inner product on
    packed activation vectors in float16 arithmetic (:func:`runs_packed`; Triton's interpreter runs
    no inline assembly, so there the same float16 FMAs are emulated)."""

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    split_k: int | None = None
    packed: bool = False  # split_config sets it per format (packs_by_default)
    # packed: one call per block_k step (all its groups, each chunk's scale by index) instead of one
    # per group (split_config's default: as fast or faster on every shape and format timed on an
    # H100, int4/g64 32% -> 45% and int2/g128 36% -> 42% of copy on Mixtral's shape)
    block_steps: bool = False
    max_registers: int | None = None  # a register cap per thread (Triton's maxnreg): more blocks per SM
    # split-K: programmatic dependent launch (sm_90+, :func:`pdl_supported`, else ignored): each
    # launch of the step after the first starts while the one before finishes and waits
    # (griddepcontrol) only before reading what that one writes
    pdl: bool = False
    # split-K, read from gate_up's config: the whole step in one launch (split_k._step_kernel: the
    # input packing, gate_up and down as work items by ticket, each waiting for what it reads);
    # split_config sets it per shape and format (one_launch_by_default)
    one_launch: bool = False
    # split-K: each program loads its first step of weights before it waits for its activations (the
    # launch before, or in one launch the items before), so those bytes are in flight meanwhile; on a
    # short step (Qwen3's are one step per program) that is all of them. Needs one step per loop
    # iteration: packed block steps, or one group per step
    preload: bool = False


def uses_gemv(plan: KernelPlan, tokens: int) -> bool:
    """Whether a step of ``tokens`` runs the one-token CUDA-core path (packed formats at one token;
    bf16 tiles go to the tensor cores without any reshuffle, and several tokens share each weight)."""
    return tokens == 1 and plan.bits < 16


def _rows_cols(plan: KernelPlan, kernel: str) -> tuple[int, int]:
    if kernel not in ("gate_up", "down"):
        raise ValueError(f"unknown decode kernel {kernel!r}: 'gate_up' or 'down'")
    h, i = plan.hidden_size, plan.intermediate_size
    return (i, h) if kernel == "gate_up" else (h, i)


def choose_config(plan: KernelPlan, kernel: str, experts: int, tokens: int, sms: int) -> LaunchConfig:
    """Tiles of the ``kernel`` ("gate_up" or "down") launch of a step of ``tokens`` tokens through
    ``experts`` experts. One token of a packed format runs split-K (:func:`split_config`: the
    tiled one-token kernels kept 10-30% of the copy bandwidth on an H100 for lack of blocks and
    bytes in flight, docs/kernels.md), on packed activation vectors where :func:`packs_by_default`
    says so; bf16 and several tokens run the tiled kernels (:func:`tiled_config`)."""
    rows, _ = _rows_cols(plan, kernel)
    if uses_gemv(plan, tokens) and plan.bits == 3 and not packs_by_default(plan):
        # int3's float32 split-K path measured no faster than the tiled one (5-6% of copy against
        # 5-8%, docs/results/kernel_variants_h200.json); its packed path is 2-3.7x faster than either
        return tiled_config(plan, rows, experts, sms, gemv=True)
    if uses_gemv(plan, tokens):
        return split_config(plan, kernel, experts, sms)
    return tiled_config(plan, rows, experts, sms, gemv=False)


def tiled_config(plan: KernelPlan, rows: int, experts: int, sms: int, gemv: bool = False) -> LaunchConfig:
    """Tiles of the tiled kernels for ``experts`` x ``rows`` output rows: the widest row block that
    still gives every SM two blocks (a decode step is bound by how many bytes are in flight, so
    parallelism comes first). Their one-token path runs one-warp blocks, so that each thread holds
    several rows and reuses each activation it loads; its tile sizes keep every block's codes in
    registers at sm_90 (no spills in the compiled code for 64 x 256 int4, 32 x 128 int2 and int8).
    (``choose_config`` before split-K; kept as the baseline the benchmark compares against.)"""
    widest = 32 if gemv else 64
    block_n = 8 if gemv else 16
    for candidate in (64, 32, 16):
        if candidate <= widest and experts * triton.cdiv(rows, candidate) >= 2 * sms:
            block_n = candidate
            break
    if gemv:
        return LaunchConfig(block_n=block_n, block_k=2 * plan.group_size if plan.bits in (3, 4) else 128, num_warps=1)
    return LaunchConfig(block_n=block_n, block_k=128 if plan.bits == 16 else 256)


def split_config(plan: KernelPlan, kernel: str, experts: int, sms: int, block_n: int | None = None,
                 block_k: int | None = None, num_warps: int = 4, blocks_per_sm: int | None = None,
                 num_stages: int = 2) -> LaunchConfig:
    """A split-K config: ``block_k`` defaults to 128 bytes of each row per step for down (one cache
    line per row: 256 int4 codes) and 64 for gate_up (which reads two weights: the same bytes per
    step, and no register spills at sm_90 where 128 spilled for int4/g64, int3 and int2/g128;
    int2's down too: 128 bytes took 200 registers and ~4x the compile time for a step that is bound
    by arithmetic, not loads);
    ``block_n`` to 64 rows (int4, int3 and int2's short steps: 128), more where a group is under 16
    bytes of a row (int2/g64), so that each thread still loads whole 16-byte vectors; then K is cut
    into as many slices as it takes for ``blocks_per_sm`` blocks per SM (at most ``MAX_SPLIT`` and the number of ``block_k`` steps in
    K). At 6 four-warp blocks of 8 KB per step per SM, ~48 KB are in flight per SM. The default is
    6, and 4 for int4's short steps: 4 of its blocks fit an SM (128 registers), and one wave of them
    measured 14.2 -> 13.3 us against 1.45 waves on Qwen3-30B-A3B's int4/g128 gate_up (H100,
    docs/results/launch_forms_variants_h100.json; on an H200 13.5 -> 11.8 us,
    launch_forms_qwen3_blocks6_h200.json; OLMoE and DeepSeek-V2-Lite the same either way)."""
    rows, cols = _rows_cols(plan, kernel)
    row_bytes = 64 if kernel == "gate_up" or plan.bits == 2 else 128  # int2: bound by arithmetic anyway
    if plan.bits == 8:  # no spills at twice the step; Mixtral's step 54% -> 72% of copy (kernel_variants_h200.json)
        row_bytes *= 2
    block_k = block_k or max(1 << (8 * row_bytes // plan.bits).bit_length() - 1, plan.group_size)
    if block_n is None:
        words_per_group = (plan.group_size or block_k) // _CODES_PER_WORD.get(plan.bits, 1)
        # int4: 128 rows measured faster on 7 of 8 shapes (Mixtral g64 184 -> 150 us; H200,
        # docs/results/kernel_variants_int4_packed_h200.json), no spills at sm_90; int2/g128 too on
        # the short (pdl) steps, cold Qwen3 17.7 -> 14.8, OLMoE 20.4 -> 16.6, DeepSeek-V2-Lite 18.8
        # -> 17.8 us, but not on Mixtral's (78.3 -> 82.2 us; H100, docs/results/int2_rows_h100.txt)
        wide = plan.bits in (4, 3) or (plan.bits == 2 and pdl_by_default(plan))
        block_n = max(128 if wide else 64, 4 * 32 * num_warps // words_per_group)
    if blocks_per_sm is None:
        blocks_per_sm = 4 if plan.bits == 4 and pdl_by_default(plan) else 6
    blocks = experts * triton.cdiv(rows, block_n)
    steps = triton.cdiv(cols, block_k)
    split = max(1, min(MAX_SPLIT, steps, triton.cdiv(blocks_per_sm * sms, blocks)))
    # int4 at 128 rows takes 152 registers (3 blocks per SM); capped at 128 (no spills at sm_90) it
    # measured 5-9% faster on Mixtral and Qwen3 shapes (docs/results/kernel_variants_int4_maxnreg_h200.json)
    cap = 128 if plan.bits == 4 else None
    return LaunchConfig(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages, split_k=split,
                        packed=packs_by_default(plan), block_steps=True, max_registers=cap,
                        pdl=pdl_by_default(plan) if PDL_OVERRIDE is None else PDL_OVERRIDE,
                        one_launch=one_launch_by_default(plan) if ONE_LAUNCH_OVERRIDE is None else ONE_LAUNCH_OVERRIDE,
                        preload=preload_by_default(plan))


def _tiling(plan: KernelPlan, config: LaunchConfig) -> dict:
    if plan.group_size:
        return dict(SUB_K=plan.group_size, SUBS=max(config.block_k // plan.group_size, 1))
    return dict(SUB_K=config.block_k, SUBS=1)


_CODES_PER_WORD = {8: 4, 4: 8, 3: 8, 2: 16}  # per packing word (int3: 24-bit words); bf16: 1


def _format_args(plan: KernelPlan, proj: Projection, interpreting: bool) -> dict:
    cpw = _CODES_PER_WORD.get(plan.bits, 1)
    return dict(ROW=proj.row_elems, KP=proj.padded_cols, GROUPS=max(proj.padded_cols // max(plan.group_size, 1), 1),
                BITS=plan.bits, CPW=cpw, W_BYTES=plan.payload_elem_bytes, F32_DOT=interpreting)


def _sm_count(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else 132  # the interpreter: any count gives the same result


@functools.lru_cache(maxsize=16)
def pdl_supported(device: torch.device) -> bool:
    """Whether split-K launches on ``device`` can use programmatic dependent launch
    (``LaunchConfig.pdl``): a Hopper or newer GPU and a Triton with ``launch_pdl`` (3.4 and later)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        from dymoe.quant.kernels import split_k
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and split_k.gdc_wait is not None


@dataclass
class DecodeWorkspace:
    """Preallocated scratch of the decode step (so the hot path allocates nothing): ``hidden`` holds
    ``silu(gate x) * up x`` per (expert, token) in bf16, ``partial`` each expert's (or each expert
    and K slice's) down projection in float32, ``gate_up_partial`` the split-K gate and up sums per
    (expert, K slice) in float32, ``counters`` one int32 per down row block and
    ``gate_up_counters`` one per (expert, gate_up row block) (zero between steps; the last program
    of each block resets its counter), ``hidden_transposed`` the split-K path's ``hidden`` in
    float32, transposed by code position for the down kernel's vector loads, or (int4, int3, int2) as
    packed activation vectors in the same bytes, and ``input_packed`` the packed split-K path's
    input (see :mod:`dymoe.quant.kernels.split_k`), ``step_counters`` the one-launch step's ticket,
    done, input-packed and per-expert ready counters (zero between steps). Buffers are flat; a step uses their
    first rows. One workspace serves one stream at a time."""

    hidden: torch.Tensor
    partial: torch.Tensor
    counters: torch.Tensor
    gate_up_partial: torch.Tensor
    gate_up_counters: torch.Tensor
    hidden_transposed: torch.Tensor
    input_packed: torch.Tensor
    step_counters: torch.Tensor

    @classmethod
    def allocate(cls, plan: KernelPlan, max_experts: int, max_tokens: int, device) -> "DecodeWorkspace":
        rows = max_experts * max_tokens
        h, i = plan.hidden_size, plan.intermediate_size
        return cls(torch.empty(rows * i, dtype=torch.bfloat16, device=device),
                   torch.empty(max(rows, max_experts * MAX_SPLIT) * h, dtype=torch.float32, device=device),
                   torch.zeros(h, dtype=torch.int32, device=device),
                   torch.empty(max_experts * MAX_SPLIT * 2 * i, dtype=torch.float32, device=device),
                   torch.zeros(max_experts * i, dtype=torch.int32, device=device),
                   torch.empty(max_experts * max(plan.down.padded_cols, packed_words(i, plan.bits)),
                               dtype=torch.float32, device=device),
                   torch.empty(packed_words(h, plan.bits), dtype=torch.int32, device=device),
                   torch.zeros(3 + max_experts, dtype=torch.int32, device=device))

    def scratch(self) -> tuple[torch.Tensor, ...]:
        """The buffers a step writes before it reads them (the checks NaN-poison these)."""
        return (self.hidden, self.partial, self.gate_up_partial, self.hidden_transposed,
                self.input_packed.view(torch.float32))

    def views(self, plan: KernelPlan, experts: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, i, rows = plan.hidden_size, plan.intermediate_size, experts * tokens
        if rows * i > self.hidden.numel() or rows * h > self.partial.numel():
            raise ValueError(f"workspace too small for {experts} experts x {tokens} tokens")
        return self.hidden[:rows * i].view(experts, tokens, i), self.partial[:rows * h].view(experts, tokens, h)


def chunk_values(bits: int) -> int:
    """Values per chunk of a packed activation vector: one 16-byte weight vector of int4 (32) or
    int2 (64) codes, 64 int3 codes (24 bytes)."""
    return 64 if bits == 3 else 128 // bits


def packed_words(values: int, bits: int) -> int:
    """32-bit words of a packed activation vector of ``values`` values for int4, int3 or int2 codes
    (split_k._pack_chunks: chunks of :func:`chunk_values` values, half as many float16x2 pairs plus
    2 words each); 0 for the formats that have no packed path."""
    if bits not in PACKED_BITS:
        return 0
    return (chunk_values(bits) // 2 + 2) * triton.cdiv(values, chunk_values(bits))


@dataclass(frozen=True)
class _Launch:
    """One cached kernel launch: the kernel, its grid and constexpr kwargs, K slices (0: tiled),
    (gate_up of a packed step) the launch that packs the input first, and the view of the pool
    its payload offsets count in (packed int3 reads 32-bit words, not bytes)."""

    kernel: object
    grid: tuple
    kwargs: dict
    split: int = 0
    prep: "_Launch | None" = None
    payload: torch.dtype | None = None
    one_launch: bool = False  # split_k._step_kernel: gate_up and down together

    @property
    def packed(self) -> bool:
        """Whether this gate_up (or one-launch step) launch runs on packed activation vectors
        (split_k._packed_step): packed first in a launch of its own or in its first items, or
        before the step (``prepacked``: by the router, :class:`InputPacking`)."""
        return bool(self.kwargs.get("PACKED"))


def k_slices(plan: KernelPlan, cols: int, config: LaunchConfig) -> tuple[int, int]:
    """(slices, columns per slice) of a split-K launch over ``cols`` stored input columns: slices
    of whole ``block_k`` steps (a slice never ends inside a step), so at most ``config.split_k``."""
    tiling = _tiling(plan, config)
    step = tiling["SUB_K"] * tiling["SUBS"]
    k_slice = triton.cdiv(triton.cdiv(cols, config.split_k), step) * step
    return triton.cdiv(cols, k_slice), k_slice


def _split_launch(kernel, plan: KernelPlan, proj: Projection, cfg: LaunchConfig, experts: int, rows: int,
                  interpreting: bool, packed: bool, pdl: bool, dependent: bool, **parts) -> _Launch:
    """A split-K launch over :func:`k_slices`. ``pdl``: the device has programmatic dependent
    launch, so ``cfg.pdl`` gives the kernel its griddepcontrol; ``dependent``: launched to start
    before the previous launch of the step ends, reading the expert ids and its first weights
    before it waits. The step's first launch may follow anything: with :data:`EARLY_STEP` it
    starts early too (``EARLY``), but waits before reading anything."""
    tiling = _tiling(plan, cfg)
    split, k_slice = k_slices(plan, proj.padded_cols, cfg)
    if split > MAX_SPLIT:
        raise ValueError(f"split_k {cfg.split_k} gives {split} K slices, more than MAX_SPLIT = {MAX_SPLIT}")
    fmt = {k: v for k, v in _format_args(plan, proj, False).items() if k != "F32_DOT"}
    payload = plan.payload_dtype
    if packed and plan.bits == 3:  # whole 24-byte chunks per row: read as 32-bit words
        payload = torch.int32
        fmt.update(ROW=proj.row_elems // 4, W_BYTES=4)
        parts = {k: v // 4 if k.endswith("_W") else v for k, v in parts.items()}
    kwargs = dict(H=plan.hidden_size, I=plan.intermediate_size, **parts, **fmt, BLOCK_N=cfg.block_n, **tiling,
                  SPLIT=split, K_SLICE=k_slice, PACKED=packed, BLOCK_STEPS=packed and cfg.block_steps,
                  ASM=not interpreting, PDL=pdl and cfg.pdl,
                  PRELOAD=cfg.preload and (packed and cfg.block_steps or tiling["SUBS"] == 1),
                  C_H=triton.cdiv(plan.intermediate_size, chunk_values(plan.bits)) if packed else 0,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if pdl and cfg.pdl and dependent:
        kwargs["launch_pdl"] = True
    else:
        kwargs.update(_early(pdl and cfg.pdl))
    if cfg.max_registers and not interpreting:
        kwargs["maxnreg"] = cfg.max_registers
    return _Launch(kernel, (experts, triton.cdiv(rows, cfg.block_n), split), kwargs, split, payload=payload)


def runs_packed(plan: KernelPlan, gate_up_config: LaunchConfig, down_config: LaunchConfig) -> bool:
    """Whether a one-token split-K step runs int4, int3 or int2 on packed activations
    (split_k._packed_step): both configs ask for it, a gate_up row block is whole chunks of ``h``
    (:func:`chunk_values`) and a step whole chunks of K (groups of at least a chunk)."""
    chunk = chunk_values(plan.bits)
    return (plan.bits in PACKED_BITS and gate_up_config.packed and down_config.packed
            and gate_up_config.block_n % chunk == 0 and plan.group_size % chunk == 0)


def step_runs_packed(plan: KernelPlan, experts: int, device: torch.device) -> bool:
    """Whether the default one-token step through ``experts`` experts of ``plan`` on ``device``
    runs on a packed activation vector (as :func:`launch_decode` runs it)."""
    sms = _sm_count(device)
    gu_cfg, d_cfg = (choose_config(plan, kernel, experts, 1, sms) for kernel in ("gate_up", "down"))
    return gu_cfg.split_k is not None and runs_packed(plan, gu_cfg, d_cfg)


@functools.lru_cache(maxsize=256)
def _launches(plan: KernelPlan, experts: int, tokens: int, sms: int, interpreting: bool,
              gate_up_config: LaunchConfig | None, down_config: LaunchConfig | None,
              math: ExpertMath = SWIGLU, pdl: bool = False, prepacked: bool = False) -> tuple[_Launch, _Launch]:
    """Both kernels' launches, computed once per step shape: the per-step host work is then two
    dictionary merges, since at ~10 us of weights per step the Python around the launches is a
    large part of a decode step. ``math`` and the plan's bias offsets specialise the activation;
    ``pdl``: the device runs programmatic dependent launches (:func:`pdl_supported`);
    ``prepacked``: the input comes packed (:class:`InputPacking`), so the step packs nothing and
    gate_up is its first launch."""
    g, u, d = plan.gate, plan.up, plan.down
    h, i = plan.hidden_size, plan.intermediate_size
    act = dict(GU_BIAS=plan.gate_up_bias, ACT=ACTIVATION_CODES[math.activation], LIMIT=float(math.limit),
               ALPHA=float(math.alpha))
    gu_cfg = gate_up_config or choose_config(plan, "gate_up", experts, tokens, sms)
    d_cfg = down_config or choose_config(plan, "down", experts, tokens, sms)
    if (gu_cfg.split_k is None) != (d_cfg.split_k is None):
        raise ValueError("gate_up and down must both be split-K configs or both tiled")
    if gu_cfg.split_k is not None:
        if tokens != 1:
            raise ValueError(f"the split-K decode kernels take one token, got {tokens}")
        from dymoe.quant.kernels.split_k import _down_split_kernel, _gate_up_split_kernel, _pack_input_kernel

        packed = runs_packed(plan, gu_cfg, d_cfg)
        if prepacked and not packed:
            raise ValueError(f"a prepacked input for a step that does not run packed (int{plan.bits}, "
                             f"group {plan.group_size})")
        pdl = pdl and not interpreting
        chunks_in = triton.cdiv(h, chunk_values(plan.bits))
        prep = _Launch(_pack_input_kernel, (triton.cdiv(h, PACK_BLOCK),),
                       dict(H=h, C=chunks_in, BITS=plan.bits, BLOCK=PACK_BLOCK, PDL=pdl and gu_cfg.pdl,
                            num_warps=PACK_WARPS, **_early(pdl and gu_cfg.pdl))) if packed and not prepacked else None
        gate_up = _split_launch(_gate_up_split_kernel, plan, g, gu_cfg, experts, i, interpreting, packed, pdl,
                                dependent=prep is not None, GATE_W=g.weight, GATE_S=g.scales, GATE_M=g.mins, UP_W=u.weight,
                                UP_S=u.scales, UP_M=u.mins, KP_DOWN=d.padded_cols, C_IN=chunks_in if packed else 0,
                                **act)
        down = _split_launch(_down_split_kernel, plan, d, d_cfg, experts, h, interpreting, packed, pdl,
                             dependent=True, DOWN_W=d.weight, DOWN_S=d.scales, DOWN_M=d.mins, D_BIAS=plan.down_bias)
        if gu_cfg.one_launch:
            return _one_launch(gate_up, down, experts, prep), down
        return dataclasses.replace(gate_up, prep=prep), down
    if prepacked:
        raise ValueError("a prepacked input for a tiled step (the packed formats' one-token steps are split-K)")
    gemv = uses_gemv(plan, tokens)
    common = dict(H=h, I=i, GEMV=gemv, BLOCK_T=2 if gemv else TOKEN_BLOCK)

    def kwargs(cfg, proj, **parts):
        return dict(common, **parts, **_format_args(plan, proj, interpreting), BLOCK_N=cfg.block_n,
                    **_tiling(plan, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    gate_up = _Launch(_gate_up_kernel, (experts, triton.cdiv(i, gu_cfg.block_n)),
                      kwargs(gu_cfg, g, GATE_W=g.weight, GATE_S=g.scales, GATE_M=g.mins, UP_W=u.weight,
                             UP_S=u.scales, UP_M=u.mins, **act))
    down = _Launch(_down_kernel, (experts, triton.cdiv(h, d_cfg.block_n)),
                   kwargs(d_cfg, d, DOWN_W=d.weight, DOWN_S=d.scales, DOWN_M=d.mins, D_BIAS=plan.down_bias))
    return gate_up, down


def _early(pdl: bool) -> dict:
    """The launch arguments of a step's first launch started early (:data:`EARLY_STEP`), or none."""
    return dict(EARLY=True, launch_pdl=True) if pdl and EARLY_STEP else {}


_PER_PROJECTION = ("ROW", "KP", "GROUPS", "CPW", "BLOCK_N", "SUB_K", "SUBS", "SPLIT", "K_SLICE")


def _one_launch(gate_up: _Launch, down: _Launch, experts: int, prep: _Launch | None) -> _Launch:
    """The whole split-K step as one launch (split_k._step_kernel): one item per program of the
    input packing (packed formats), gate_up's and down's grids, each projection's tiling under a
    G_ or D_ prefix. The step's only launch, so never launched early (no pdl)."""
    from dymoe.quant.kernels.split_k import _step_kernel

    g, d = gate_up.kwargs, down.kwargs
    kwargs = {k: v for k, v in g.items() if k not in _PER_PROJECTION and k not in ("PDL", "EARLY", "launch_pdl")}
    kwargs.update({f"G_{k}": g[k] for k in _PER_PROJECTION}, G_BLOCKS=gate_up.grid[1])
    kwargs.update({f"D_{k}": d[k] for k in _PER_PROJECTION}, D_BLOCKS=down.grid[1])
    kwargs.update(DOWN_W=d["DOWN_W"], DOWN_S=d["DOWN_S"], DOWN_M=d["DOWN_M"], D_BIAS=d["D_BIAS"],
                  PRELOAD=g["PRELOAD"] and d["PRELOAD"])
    pack_items = 0 if prep is None else prep.grid[0]
    if prep is not None:
        kwargs.update(PACK_ITEMS=pack_items, PACK_BLOCK=prep.kwargs["BLOCK"])
    items = pack_items + experts * (gate_up.grid[1] * gate_up.split + down.grid[1] * down.split)
    return _Launch(_step_kernel, (items,), kwargs, gate_up.split, None, gate_up.payload, one_launch=True)


def trace_rows(grid: tuple) -> int:
    """Rows a launch of ``grid`` stamps in its trace buffer (``launch_decode(trace=)``): one per program."""
    return grid[0] * grid[1] * grid[2]


def _trace_args(trace: tuple, gate_up: _Launch, down: _Launch) -> tuple[dict, dict]:
    """The traced launches' extra arguments, after checking the buffers (``launch_decode(trace=)``)."""
    from dymoe.quant.kernels.split_k import TRACE_FIELDS

    if gate_up.one_launch:
        raise ValueError("trace= stamps the two split-K launches; this step runs in one launch "
                         "(pass configs with one_launch=False)")
    args = []
    for buffer, launch, name in zip(trace, (gate_up, down), ("gate_up", "down")):
        need = trace_rows(launch.grid) * TRACE_FIELDS.value
        if buffer.dtype != torch.int64 or buffer.numel() < need or not buffer.is_contiguous():
            raise ValueError(f"trace buffer for {name}: needs {need} contiguous int64 values, got "
                             f"{buffer.numel()} {buffer.dtype}")
        args.append(dict(TRACE=True, trace_ptr=buffer))
    return args[0], args[1]


def launch_decode(pool: torch.Tensor, slot_offsets: torch.Tensor, plan: KernelPlan, x: torch.Tensor,
                  combine: torch.Tensor, workspace: DecodeWorkspace | None = None,
                  gate_up_config: LaunchConfig | None = None,
                  down_config: LaunchConfig | None = None, math: ExpertMath = SWIGLU,
                  slot_ids: torch.Tensor | None = None, x_packed: torch.Tensor | None = None,
                  trace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The Triton path of :func:`dymoe.quant.kernels.expert_decode` (same arguments and result):
    two launches, the second of which also sums the experts into the result. The configs default
    to :func:`choose_config`'s; the benchmark passes others. ``slot_ids`` [E]: ``slot_offsets`` is
    then a table of every slot's offset, which the kernels index by these ids. ``x_packed``: x
    already as the step's packed activation vector (int32, :func:`input_packing`'s buffer, which
    the router's launch fills), so the step packs nothing. ``trace``: two int64 buffers, of at
    least :func:`trace_rows` x ``split_k.TRACE_FIELDS`` values each, that a split-K step's two launches
    stamp with the GPU's global timer (``benchmarks/step_timeline.py``; not the one-launch form)."""
    t, e = combine.shape
    if t > TOKEN_BLOCK:
        raise ValueError(f"the decode kernels take at most {TOKEN_BLOCK} tokens per launch, got {t}")
    x = x.contiguous()
    combine = combine.contiguous()
    indirect = slot_ids is not None
    ids = slot_ids if indirect else slot_offsets  # (not read without INDIRECT)
    workspace = workspace or DecodeWorkspace.allocate(plan, e, t, x.device)
    gate_up, down = _launches(plan, e, t, _sm_count(pool.device), interpreting(),
                              gate_up_config, down_config, math, pdl_supported(pool.device), x_packed is not None)
    payload, scales = pool.view(gate_up.payload or plan.payload_dtype), pool.view(torch.float16)
    out = torch.empty_like(x)
    if gate_up.split:
        ws = workspace
        hidden = ws.hidden_transposed.view(torch.int32) if gate_up.packed else ws.hidden_transposed
        if (e * gate_up.split * 2 * plan.intermediate_size > ws.gate_up_partial.numel()
                or e * down.split * plan.hidden_size > ws.partial.numel()
                or e * plan.down.padded_cols > hidden.numel()
                or gate_up.packed and e * packed_words(plan.intermediate_size, plan.bits) > hidden.numel()):
            raise ValueError(f"workspace too small for {e} experts at split-K {gate_up.split}/{down.split}")
        if x_packed is not None and x_packed.numel() < packed_words(plan.hidden_size, plan.bits):
            raise ValueError(f"a packed input of {x_packed.numel()} words, int{plan.bits} of "
                             f"{plan.hidden_size} values takes {packed_words(plan.hidden_size, plan.bits)}")
        packed_x = x_packed if x_packed is not None else ws.input_packed if gate_up.packed else x
        traced = ({}, {}) if trace is None else _trace_args(trace, gate_up, down)
        if gate_up.prep is not None:  # the input as a packed activation vector
            gate_up.prep.kernel[gate_up.prep.grid](x, packed_x, **gate_up.prep.kwargs)
        if gate_up.one_launch:  # (packed formats: the input packed by the launch's first items, unless given)
            if 3 + e > ws.step_counters.numel():
                raise ValueError(f"workspace too small for {e} experts in one launch")
            gate_up.kernel[gate_up.grid](payload, scales, slot_offsets, ids, combine, x, packed_x, hidden,
                                         ws.gate_up_partial, ws.gate_up_counters, ws.partial, out, ws.counters,
                                         ws.step_counters, e, **gate_up.kwargs, INDIRECT=indirect)
            return out
        gate_up.kernel[gate_up.grid](payload, scales, slot_offsets, ids, combine, packed_x, hidden,
                                     ws.gate_up_partial, ws.gate_up_counters, e, **gate_up.kwargs, INDIRECT=indirect,
                                     **traced[0])
        down.kernel[down.grid](payload, scales, slot_offsets, ids, combine, hidden, ws.partial, out, ws.counters, e,
                               **down.kwargs, INDIRECT=indirect, **traced[1])
        return out
    if trace is not None:
        raise ValueError("trace= stamps the split-K kernels; this step runs the tiled ones")
    hidden, partial = workspace.views(plan, e, t)
    gate_up.kernel[gate_up.grid](payload, scales, slot_offsets, ids, combine, x, hidden, t, e, **gate_up.kwargs,
                                 INDIRECT=indirect)
    down.kernel[down.grid](payload, scales, slot_offsets, ids, combine, hidden, partial, out, workspace.counters, t, e,
                           **down.kwargs, INDIRECT=indirect)
    return out
