"""Triton kernels: the one-token decode step as split-K GEMVs, for more blocks and bytes in flight.

At one token a decode step is a pure read of the experts' weights, so its speed is how many bytes
the SMs keep in flight (HBM needs ~40-64 KB per SM on an H100). The tiled kernels of
:mod:`dymoe.quant.kernels.triton_experts` give each program whole rows (all K), so a step launches
``experts x rows / BLOCK_N`` programs: at Qwen3-30B-A3B's gate_up (8 x 768 rows) that is ~1.5 blocks
per SM, at Mixtral's down (2 x 4096 rows, K = 14336) each block loops 56 times with one group in
flight. Here a program takes ``BLOCK_N`` rows and one slice of K (grid ``experts x row blocks x
SPLIT``), so the grid has several blocks per SM whatever the shape.

Two launches, as in the tiled path, and still deterministic:

1. ``_gate_up_split_kernel``: each program writes its slice's gate and up sums to a float32 scratch
   ``[E, SPLIT, 2, I]``; the last of a row block's SPLIT programs to finish (an acq_rel counter,
   reset by that program) adds the slices in slice order and writes
   ``h = combine * silu(gate x) * (up x)``. With SPLIT 1 the program writes ``h`` itself. ``h`` is
   float32 (never rounded) and transposed by code position (:func:`_transposed`), so that the
   down kernel loads a thread's activations for one code position as one 16-byte vector.
2. ``_down_split_kernel``: each program writes its slice's partial of ``down h`` to
   ``partial[E * SPLIT, H]``; the last of a row block's ``E * SPLIT`` programs sums them in a fixed
   order and writes ``y`` (:func:`~dymoe.quant.kernels.triton_experts._sum_experts`).

The inner product is the tiled path's one-token GEMV (codes kept in their 32-bit packing words,
turned into floats by the mantissa trick of
:func:`~dymoe.quant.kernels.triton_experts._code_value`, group scale and min applied once per
group); gate and up share each activation load. bf16 runs the same loop with one weight per word.
Why and what it is expected to gain: docs/kernels.md, "One token: split-K".
"""

import triton
import triton.language as tl

from dymoe.quant.kernels.triton_experts import (_bias, _code_value, _expert_slot, _glu, _group_terms, _live,
                                                 _row_scales, _sum_experts, _unit_tile)


@triton.jit
def _units(w_ptr, w_base, rows, row_ok, k0, ROW: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr,
           CPW: tl.constexpr, SUB_K: tl.constexpr):
    """[BLOCK_N, SUB_K // CPW] packing words as uint32 (int8's bytes biased by 128), or bf16 values."""
    units = _unit_tile(w_ptr, w_base, rows, row_ok, k0, ROW, KP, BITS, CPW, SUB_K)
    if BITS != 16:
        units = units.to(tl.uint32, bitcast=True)
        if BITS == 8:
            units = units ^ 0x80808080  # signed bytes to codes biased by 128
    return units


@triton.jit
def _value(units, j: tl.constexpr, BITS: tl.constexpr):
    """Weight ``j`` of each packing word as float32 (bf16: the value itself; codes: exact integers)."""
    if BITS == 16:
        v = units.to(tl.float32)
    else:
        v = _code_value(units, j, BITS)
    return v


@triton.jit
def _half2(lo, hi):
    """Two float32 vectors rounded to float16 and packed in uint32 words (``lo`` in the low half)."""
    lo16 = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    hi16 = hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return lo16 | (hi16 << 16)


@triton.jit
def _int4_dot8(words, p0, p1, p2, p3):
    """Per int4 word (codes c0..c7 in nibbles 0..7): ``sum_j c_j * x_j`` as two float16 halves of a
    uint32, from the activation pairs ``p_k = (x_k, x_{k+4})`` packed as float16x2.

    Masking a word with 0x000F000F leaves codes k and k+4 as the raw bits of two float16 subnormals,
    ``c * 2**-24``, so one AND and one packed FMA (``fma.rn.f16x2``, subnormals kept) handle two
    codes: 11 instructions for 8 codes against ~24 for the float32 path (LOP3 + FADD + FFMA per
    code), which is what bounds that path on large shapes. The caller prescales the activations
    by a power of two so that the products are normal float16 numbers, and accumulates only the 4
    products per half in float16 before converting."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, w, a;
        and.b32 t, $1, 0x000F000F;
        mul.rn.f16x2 a, t, $2;
        shr.b32 w, $1, 4;
        and.b32 t, w, 0x000F000F;
        fma.rn.f16x2 a, t, $3, a;
        shr.b32 w, $1, 8;
        and.b32 t, w, 0x000F000F;
        fma.rn.f16x2 a, t, $4, a;
        shr.b32 w, $1, 12;
        and.b32 t, w, 0x000F000F;
        fma.rn.f16x2 $0, t, $5, a;
        }""",
        constraints="=r,r,r,r,r,r", args=[words, p0, p1, p2, p3], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _half2_value(acc, back):
    """Float16x2 sums (uint32) as float32: both halves added, times ``back`` (undoes the prescale)."""
    lo = (acc & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (acc >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return (lo + hi) * back


@triton.jit
def _prescale(a0, a1, a2, a3, a4, a5, a6, a7):
    """The power of two that brings the largest of a step's activations into [2**14, 2**15): float16
    keeps them with 11 bits, and their products with int4 codes as subnormals (``c * 2**-24``) stay
    normal numbers, without overflow in a sum of four. Returns (scale, 2**24 / scale)."""
    amax = tl.maximum(tl.maximum(tl.maximum(tl.abs(a0), tl.abs(a1)), tl.maximum(tl.abs(a2), tl.abs(a3))),
                      tl.maximum(tl.maximum(tl.abs(a4), tl.abs(a5)), tl.maximum(tl.abs(a6), tl.abs(a7))))
    amax = tl.max(amax, axis=0)
    e = tl.floor(tl.log2(tl.maximum(amax, 1e-30)))
    scale = tl.exp2(14.0 - e)
    return scale, 16777216.0 / scale


@triton.jit
def _pair_step(acc_g, m_g, acc_u, m_u, w_ptr, s_ptr, gate_w, gate_s, gate_m, up_w, up_s, up_m, rows, row_ok,
               k0, a_ptr, a_cols, ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
               CPW: tl.constexpr, SUB_K: tl.constexpr, PACKED: tl.constexpr):
    """Gate and up rows ``rows`` times ``a[k0 : k0 + SUB_K]``, both tiles loaded before any
    arithmetic (twice the bytes in flight of one) and each activation loaded once for both."""
    units_g = _units(w_ptr, gate_w, rows, row_ok, k0, ROW, KP, BITS, CPW, SUB_K)
    units_u = _units(w_ptr, up_w, rows, row_ok, k0, ROW, KP, BITS, CPW, SUB_K)
    k = k0 + tl.arange(0, SUB_K // CPW) * CPW  # each word's first column
    if PACKED:  # int4 through packed float16 FMAs (_int4_dot8)
        a0 = tl.load(a_ptr + k, mask=k < a_cols, other=0.0).to(tl.float32)
        a1 = tl.load(a_ptr + k + 1, mask=k + 1 < a_cols, other=0.0).to(tl.float32)
        a2 = tl.load(a_ptr + k + 2, mask=k + 2 < a_cols, other=0.0).to(tl.float32)
        a3 = tl.load(a_ptr + k + 3, mask=k + 3 < a_cols, other=0.0).to(tl.float32)
        a4 = tl.load(a_ptr + k + 4, mask=k + 4 < a_cols, other=0.0).to(tl.float32)
        a5 = tl.load(a_ptr + k + 5, mask=k + 5 < a_cols, other=0.0).to(tl.float32)
        a6 = tl.load(a_ptr + k + 6, mask=k + 6 < a_cols, other=0.0).to(tl.float32)
        a7 = tl.load(a_ptr + k + 7, mask=k + 7 < a_cols, other=0.0).to(tl.float32)
        asum = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
        scale, back = _prescale(a0, a1, a2, a3, a4, a5, a6, a7)
        p0, p1 = _half2(a0 * scale, a4 * scale), _half2(a1 * scale, a5 * scale)
        p2, p3 = _half2(a2 * scale, a6 * scale), _half2(a3 * scale, a7 * scale)
        part_g = _half2_value(_int4_dot8(units_g, p0[None, :], p1[None, :], p2[None, :], p3[None, :]), back)
        part_u = _half2_value(_int4_dot8(units_u, p0[None, :], p1[None, :], p2[None, :], p3[None, :]), back)
    else:
        part_g = tl.zeros(units_g.shape, dtype=tl.float32)
        part_u = tl.zeros(units_u.shape, dtype=tl.float32)
        asum = tl.zeros(k.shape, dtype=tl.float32)
        for j in tl.static_range(CPW):
            a = tl.load(a_ptr + k + j, mask=k + j < a_cols, other=0.0).to(tl.float32)
            part_g += _value(units_g, j, BITS) * a[None, :]
            part_u += _value(units_u, j, BITS) * a[None, :]
            asum += a
    acc_g, m_g = _group_terms(acc_g, m_g, part_g, asum, s_ptr, gate_s, gate_m, rows, row_ok, k0, GROUPS, BITS,
                              SUB_K)
    acc_u, m_u = _group_terms(acc_u, m_u, part_u, asum, s_ptr, up_s, up_m, rows, row_ok, k0, GROUPS, BITS, SUB_K)
    return acc_g, m_g, acc_u, m_u


@triton.jit
def _single_step(acc, acc_m, w_ptr, s_ptr, w_base, s_base, m_base, rows, row_ok, k0, at_ptr,
                 A_COLS: tl.constexpr, ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr,
                 BITS: tl.constexpr, CPW: tl.constexpr, SUB_K: tl.constexpr, PACKED: tl.constexpr):
    """Rows ``rows`` of one weight times ``a[k0 : k0 + SUB_K]``, where the activations come
    transposed by code position (:func:`_transposed`), so the values a thread needs for code ``j``
    of its consecutive words are consecutive floats: one vector load, no conversion."""
    units = _units(w_ptr, w_base, rows, row_ok, k0, ROW, KP, BITS, CPW, SUB_K)
    words = k0 // CPW + tl.arange(0, SUB_K // CPW)
    if PACKED:  # int4 through packed float16 FMAs (_int4_dot8); CPW is 8
        a0 = tl.load(at_ptr + words, mask=words < (A_COLS + 7) // 8, other=0.0)
        a1 = tl.load(at_ptr + (KP // 8) + words, mask=words < (A_COLS + 6) // 8, other=0.0)
        a2 = tl.load(at_ptr + 2 * (KP // 8) + words, mask=words < (A_COLS + 5) // 8, other=0.0)
        a3 = tl.load(at_ptr + 3 * (KP // 8) + words, mask=words < (A_COLS + 4) // 8, other=0.0)
        a4 = tl.load(at_ptr + 4 * (KP // 8) + words, mask=words < (A_COLS + 3) // 8, other=0.0)
        a5 = tl.load(at_ptr + 5 * (KP // 8) + words, mask=words < (A_COLS + 2) // 8, other=0.0)
        a6 = tl.load(at_ptr + 6 * (KP // 8) + words, mask=words < (A_COLS + 1) // 8, other=0.0)
        a7 = tl.load(at_ptr + 7 * (KP // 8) + words, mask=words < A_COLS // 8, other=0.0)
        asum = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
        scale, back = _prescale(a0, a1, a2, a3, a4, a5, a6, a7)
        p0, p1 = _half2(a0 * scale, a4 * scale), _half2(a1 * scale, a5 * scale)
        p2, p3 = _half2(a2 * scale, a6 * scale), _half2(a3 * scale, a7 * scale)
        part = _half2_value(_int4_dot8(units, p0[None, :], p1[None, :], p2[None, :], p3[None, :]), back)
    else:
        part = tl.zeros(units.shape, dtype=tl.float32)
        asum = tl.zeros(words.shape, dtype=tl.float32)
        for j in tl.static_range(CPW):
            # a constexpr bound (words whose code j is a real column), so the mask does not stop vector loads
            a = tl.load(at_ptr + j * (KP // CPW) + words, mask=words < (A_COLS - j + CPW - 1) // CPW, other=0.0)
            part += _value(units, j, BITS) * a[None, :]
            asum += a
    return _group_terms(acc, acc_m, part, asum, s_ptr, s_base, m_base, rows, row_ok, k0, GROUPS, BITS, SUB_K)


@triton.jit
def _transposed(rows, KP: tl.constexpr, CPW: tl.constexpr):
    """Where activation ``rows`` go in the transposed layout: column ``k = CPW * word + j`` at
    ``j * (KP / CPW) + word``."""
    return (rows % CPW) * (KP // CPW) + rows // CPW


@triton.jit
def _k_slice(active, KP: tl.constexpr, K_SLICE: tl.constexpr):
    """This program's input columns [start, end) (empty for an expert no token uses)."""
    start = tl.program_id(2) * K_SLICE
    end = tl.minimum(start + K_SLICE, KP)
    return start, tl.where(active, end, start)


@triton.jit
def _gate_up_split_kernel(w_ptr, s_ptr, offsets_ptr, combine_ptr, x_ptr, h_ptr, gu_ptr, counters_ptr, E,
                          H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                          GATE_W: tl.constexpr, GATE_S: tl.constexpr, GATE_M: tl.constexpr,
                          UP_W: tl.constexpr, UP_S: tl.constexpr, UP_M: tl.constexpr,
                          ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                          CPW: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, SUBS: tl.constexpr,
                          SPLIT: tl.constexpr, K_SLICE: tl.constexpr, KP_DOWN: tl.constexpr,
                          PACKED: tl.constexpr = False, GU_BIAS: tl.constexpr = -1, ACT: tl.constexpr = 0,
                          LIMIT: tl.constexpr = 7.0, ALPHA: tl.constexpr = 1.702):
    e = tl.program_id(0)
    block = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < I
    h_at = h_ptr + e * KP_DOWN + _transposed(rows, KP_DOWN, CPW)  # float32, transposed for the down kernel
    w_slot, s_slot, _, c, active = _expert_slot(offsets_ptr, combine_ptr, e, 1, E, W_BYTES, 2)
    live = _live(rows, row_ok, active)
    gate_w, gate_s, gate_m = w_slot + GATE_W, s_slot + GATE_S, s_slot + GATE_M
    up_w, up_s, up_m = w_slot + UP_W, s_slot + UP_S, s_slot + UP_M
    acc_g = tl.zeros((BLOCK_N, SUB_K // CPW), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, SUB_K // CPW), dtype=tl.float32)
    m_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start, end = _k_slice(active, KP, K_SLICE)
    for k0 in range(start, end, SUB_K * SUBS):
        for sub in tl.static_range(SUBS):  # several groups per step: more bytes in flight per block
            acc_g, m_g, acc_u, m_u = _pair_step(acc_g, m_g, acc_u, m_u, w_ptr, s_ptr, gate_w, gate_s, gate_m, up_w,
                                                up_s, up_m, rows, row_ok, k0 + sub * SUB_K, x_ptr, H, ROW, KP,
                                                GROUPS, BITS, CPW, SUB_K, PACKED)
    gate = (tl.sum(acc_g, axis=1) + m_g) * _row_scales(s_ptr, gate_s, rows, live, BITS)
    up = (tl.sum(acc_u, axis=1) + m_u) * _row_scales(s_ptr, up_s, rows, live, BITS)
    weight = tl.sum(c, axis=0)  # one token: the routing column's only entry
    if SPLIT == 1:
        gate += _bias(s_ptr, s_slot, GU_BIAS, rows, live)
        up += _bias(s_ptr, s_slot, GU_BIAS, rows + I, live)  # up's biases follow gate's
        tl.store(h_at, _glu(gate, up, ACT, LIMIT, ALPHA) * weight, mask=row_ok)
    else:
        slices = gu_ptr + e * (SPLIT * 2 * I)
        tl.store(slices + tl.program_id(2) * (2 * I) + rows, gate, mask=row_ok)
        tl.store(slices + tl.program_id(2) * (2 * I) + I + rows, up, mask=row_ok)
        tl.debug_barrier()  # every thread's stores happen before the release below
        counter = counters_ptr + e * tl.num_programs(1) + block
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT - 1:
            gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
            up = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for p in range(SPLIT):  # in slice order, whichever program came last: deterministic
                gate += tl.load(slices + p * (2 * I) + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
                up += tl.load(slices + p * (2 * I) + I + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            gate += _bias(s_ptr, s_slot, GU_BIAS, rows, live)
            up += _bias(s_ptr, s_slot, GU_BIAS, rows + I, live)
            tl.store(h_at, _glu(gate, up, ACT, LIMIT, ALPHA) * weight, mask=row_ok)
            tl.atomic_xchg(counter, 0)


@triton.jit
def _down_split_kernel(w_ptr, s_ptr, offsets_ptr, combine_ptr, h_ptr, partial_ptr, out_ptr, counters_ptr, E,
                       H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                       DOWN_W: tl.constexpr, DOWN_S: tl.constexpr, DOWN_M: tl.constexpr,
                       ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                       CPW: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, SUBS: tl.constexpr,
                       SPLIT: tl.constexpr, K_SLICE: tl.constexpr, PACKED: tl.constexpr = False,
                       D_BIAS: tl.constexpr = -1):
    e = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < H
    w_slot, s_slot, t, c, active = _expert_slot(offsets_ptr, combine_ptr, e, 1, E, W_BYTES, 2)
    live = _live(rows, row_ok, active)
    down_w, down_s, down_m = w_slot + DOWN_W, s_slot + DOWN_S, s_slot + DOWN_M
    acc = tl.zeros((BLOCK_N, SUB_K // CPW), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start, end = _k_slice(active, KP, K_SLICE)
    for k0 in range(start, end, SUB_K * SUBS):
        for sub in tl.static_range(SUBS):
            acc, acc_m = _single_step(acc, acc_m, w_ptr, s_ptr, down_w, down_s, down_m, rows, row_ok,
                                      k0 + sub * SUB_K, h_ptr + e * KP, I, ROW, KP, GROUPS, BITS, CPW, SUB_K,
                                      PACKED)
    out = (tl.sum(acc, axis=1) + acc_m) * _row_scales(s_ptr, down_s, rows, live, BITS)
    if D_BIAS >= 0:  # the router weight times the expert's bias, once (in the first slice's partial)
        first = (tl.program_id(2) == 0).to(tl.float32)
        out += _bias(s_ptr, s_slot, D_BIAS, rows, live) * (tl.sum(c, axis=0) * first)
    tl.store(partial_ptr + (e * SPLIT + tl.program_id(2)) * H + rows, out, mask=row_ok)
    # partial row e * SPLIT + slice is "expert" e * SPLIT + slice of one token for the shared sum
    mask = row_ok[:, None] & (t[None, :] < 1)
    _sum_experts(partial_ptr, out_ptr, counters_ptr + tl.program_id(1), rows, t, mask, 1, E * SPLIT, H, BLOCK_N, 2)
