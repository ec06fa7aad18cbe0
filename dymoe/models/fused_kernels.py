"""The Triton kernels of :mod:`dymoe.models.fused` (imported only when they run: Triton is the
``gpu`` extra)."""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from dymoe.quant.kernels.split_k import _pack_item, gdc_launch_dependents, gdc_wait


@triton.jit
def _let_next_start(PDL: tl.constexpr):
    """PDL (the launch is a programmatic dependent one, :func:`dymoe.models.fused.chained`): the
    launch after this one may start now; it waits for this one in :func:`_await_previous`."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _await_previous(PDL: tl.constexpr):
    """PDL: wait until the launch before has finished and its writes are visible. Every read of
    what a launch before wrote, and every write, comes after this (only constant weights may be
    read before it); every launch with PDL calls it, so the wait covers all launches before."""
    if PDL:
        gdc_wait()


@triton.jit
def _chain(PDL: tl.constexpr):
    """:func:`_let_next_start`, then :func:`_await_previous`: a kernel that reads nothing early."""
    _let_next_start(PDL)
    _await_previous(PDL)


@triton.jit
def rounded(v, ty: tl.constexpr):
    """``v`` (float32) rounded to ``ty`` and back, as a torch op's result is. bf16 by bit
    arithmetic (round to nearest even): a cast pair may be folded away by the compiler, which
    then fuses the product into the next add (seen on an H100: 1-ulp differences in 14% of
    the rotary outputs)."""
    if ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return v.to(ty).to(tl.float32)


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _chain(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    y = rounded(x * tl.math.rsqrt(var + eps), x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * N + cols, rounded(w * y, ty).to(ty), mask=mask)


@triton.jit
def rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, start, H, T, sxb, sxh, sxt, sob, soh, sot,
                  D: tl.constexpr, BLOCK: tl.constexpr, FROM_DEVICE: tl.constexpr, PDL: tl.constexpr = False):
    _chain(PDL)
    pid = tl.program_id(0)
    b, h, t = pid // (H * T), (pid // T) % H, pid % T
    pos = tl.load(pos_ptr + t) if FROM_DEVICE else start + t
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    half = D // 2
    at = x_ptr + b.to(tl.int64) * sxb + h * sxh + t * sxt
    x = tl.load(at + cols, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(at + (cols + half) % D, mask=mask, other=0.0).to(tl.float32)
    rotated = tl.where(cols < half, -partner, partner)  # rotate_half: (-x2, x1)
    c = tl.load(cos_ptr + pos.to(tl.int64) * D + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos.to(tl.int64) * D + cols, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    out = rounded(rounded(x * c, ty) + rounded(rotated * s, ty), ty)
    tl.store(out_ptr + b.to(tl.int64) * sob + h * soh + t * sot + cols, out.to(ty), mask=mask)


@triton.jit
def add_rms_norm_kernel(a_ptr, b_ptr, w_ptr, sum_ptr, out_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr = False):
    """A residual add and the RMSNorm of its result, per row: the sum rounded and stored as a torch
    add's, then normalised as :func:`rms_norm_kernel` does."""
    _chain(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    ty_sum = sum_ptr.dtype.element_ty
    a = tl.load(a_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    x = rounded(a + tl.load(b_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32), ty_sum)
    tl.store(sum_ptr + row * N + cols, x.to(ty_sum), mask=mask)
    var = tl.sum(x * x, axis=0) / N
    y = rounded(x * tl.math.rsqrt(var + eps), ty_sum)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * N + cols, rounded(w * y, ty).to(ty), mask=mask)


@triton.jit
def _decode_head(src, w_ptr, dst, eps, c, s, cols, mask, D: tl.constexpr, NORM: tl.constexpr):
    """One head of the decode token: optionally RMSNorm'd (as :func:`rms_norm_kernel`), then
    rotated (as :func:`rotary_kernel`), stored at ``dst``. rotate_half needs each value's partner
    half a head away, so the partners are loaded and normalised too (the same scalar scale)."""
    ty = dst.dtype.element_ty
    partner_cols = (cols + D // 2) % D
    x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(src + partner_cols, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        scale = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        x = rounded(tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * rounded(x * scale, ty), ty)
        partner = rounded(tl.load(w_ptr + partner_cols, mask=mask, other=0.0).to(tl.float32)
                          * rounded(partner * scale, ty), ty)
    rotated = tl.where(cols < D // 2, -partner, partner)
    out = rounded(rounded(x * c, ty) + rounded(rotated * s, ty), ty)
    tl.store(dst + cols, out.to(ty), mask=mask)


@triton.jit
def qkv_decode_kernel(q_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, eps, cos_ptr, sin_ptr, pos_ptr, q_out_ptr,
                      k_cache_ptr, v_cache_ptr, HQ, CONTEXT, D: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_V: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr = False):
    """A decode token's attention inputs in one launch: program h < HQ takes q head h (norm,
    rotary, into ``q_out`` [HQ, D]); program HQ + j takes k head j (norm, rotary) and v head j,
    into row ``pos`` of the layer's caches [heads, CONTEXT, D] (position read on the device)."""
    _chain(PDL)
    h = tl.program_id(0)
    pos = tl.load(pos_ptr).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    c = tl.load(cos_ptr + pos * D + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * D + cols, mask=mask, other=0.0).to(tl.float32)
    if h < HQ:
        _decode_head(q_ptr + h * D, q_norm_ptr, q_out_ptr + h * D, eps, c, s, cols, mask, D, NORM)
    else:
        j = h - HQ
        row = j.to(tl.int64) * CONTEXT + pos
        _decode_head(k_ptr + j * D, k_norm_ptr, k_cache_ptr + row * D, eps, c, s, cols, mask, D, NORM)
        vcols = tl.arange(0, BLOCK_V)
        v = tl.load(v_ptr + j * DV + vcols, mask=vcols < DV, other=0.0)
        tl.store(v_cache_ptr + row * DV + vcols, v.to(v_cache_ptr.dtype.element_ty), mask=vcols < DV)


@triton.jit
def _exp(x, ACCURATE: tl.constexpr):
    """exp correctly rounded as CUDA's expf is (libdevice; tl.exp is a faster approximation);
    ACCURATE off under Triton's interpreter, which runs no libdevice (numpy's exp there)."""
    if ACCURATE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _route(logits, cols, row, ids_in_ptr, ids_ptr, weights_ptr, E, scaling, K: tl.constexpr, BLOCK: tl.constexpr,
           KB: tl.constexpr, GIVEN: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
           ACCURATE: tl.constexpr):
    """One token's routing from its router logits [BLOCK] (float32, -inf past ``E``): every
    expert's score (float32 softmax or sigmoid), then the ``K`` best (GIVEN: the ``K`` experts of
    ``ids_in``) best first (the lowest index among equal scores), their scores renormalised
    (NORMALIZE) and times ``scaling``, stored as ids (int64) and weights (the output's dtype) in
    row ``row``. The torch code's operations in its order (exp, then IEEE divisions), so only the
    softmax sum's order differs. The choice takes K rounds of two block-wide reductions (ranking
    every candidate at once over a [candidates, candidates] comparison was tried in stop 25: the
    same ids and weights, but slower on every router timed, 2.2x on Qwen3's 128 experts)."""
    if SIGMOID:
        scores = tl.math.div_rn(tl.full((BLOCK,), 1.0, tl.float32), 1.0 + _exp(-logits, ACCURATE))
    else:
        e = _exp(logits - tl.max(logits, axis=0), ACCURATE)
        scores = tl.math.div_rn(e, tl.sum(e, axis=0) + tl.zeros((BLOCK,), tl.float32))
    scores = tl.where(cols < E, scores, float("-inf"))
    slots = tl.arange(0, KB)
    if GIVEN:  # the chosen experts' scores, to be put in order
        given = tl.load(ids_in_ptr + row * K + slots, mask=slots < K, other=0)
        picked = tl.sum(tl.where(cols[None, :] == given[:, None], scores[None, :], 0.0), axis=1)
        pool = tl.where(slots < K, picked, float("-inf"))
    chosen_ids = tl.zeros((KB,), dtype=tl.int64)
    chosen = tl.zeros((KB,), dtype=tl.float32)
    for j in tl.static_range(K):
        if GIVEN:
            best = tl.max(pool, axis=0)
            at = tl.min(tl.where(pool == best, slots, KB), axis=0)  # the first of equal scores
            expert = tl.sum(tl.where(slots == at, given, 0), axis=0)
            pool = tl.where(slots == at, float("-inf"), pool)
        else:
            best = tl.max(scores, axis=0)
            expert = tl.min(tl.where(scores == best, cols, BLOCK), axis=0)
            scores = tl.where(cols == expert, float("-inf"), scores)
        chosen_ids = tl.where(slots == j, expert.to(tl.int64), chosen_ids)
        chosen = tl.where(slots == j, best, chosen)
    if NORMALIZE:
        chosen = tl.math.div_rn(chosen, tl.sum(chosen, axis=0) + tl.zeros((KB,), tl.float32))
    chosen = chosen * scaling
    ty = weights_ptr.dtype.element_ty
    tl.store(ids_ptr + row * K + slots, chosen_ids, mask=slots < K)
    tl.store(weights_ptr + row * K + slots, rounded(chosen, ty).to(ty), mask=slots < K)


@triton.jit
def route_kernel(logits_ptr, ids_in_ptr, ids_ptr, weights_ptr, E, scaling, K: tl.constexpr, BLOCK: tl.constexpr,
                 KB: tl.constexpr, GIVEN: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
                 ACCURATE: tl.constexpr, PDL: tl.constexpr = False):
    """One token's routing (row ``program_id``) from its router logits: :func:`_route`."""
    _chain(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    logits = tl.load(logits_ptr + row * E + cols, mask=cols < E, other=float("-inf")).to(tl.float32)
    _route(logits, cols, row, ids_in_ptr, ids_ptr, weights_ptr, E, scaling, K, BLOCK, KB, GIVEN, SIGMOID, NORMALIZE,
           ACCURATE)


@triton.jit
def _linear_rows(out_ptr, b_ptr, rows, row_ok, acc, BIAS: tl.constexpr):
    """A block of a linear layer's outputs from their float32 sums: plus the bias (in float32, as
    cuBLAS's epilogue adds it), rounded once to the output's dtype."""
    if BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows, rounded(acc, ty).to(ty), mask=row_ok)


@triton.jit
def _route_when_last(out_ptr, counter, ids_in_ptr, ids_ptr, weights_ptr, scaling, N: tl.constexpr,
                     BLOCKS: tl.constexpr, TOP_K: tl.constexpr, E_BLOCK: tl.constexpr, KB: tl.constexpr,
                     GIVEN: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr, ACCURATE: tl.constexpr):
    """Called by each row block once its logits are stored: the last of the ``BLOCKS`` routes the
    token from all ``N`` logits (read back rounded, as the router's linear layer returns them)
    and resets ``counter``."""
    tl.debug_barrier()  # every thread's logit stores happen before the release below
    if tl.atomic_add(counter, 1, sem="acq_rel") == BLOCKS - 1:
        cols = tl.arange(0, E_BLOCK)
        logits = tl.load(out_ptr + cols, mask=cols < N, other=float("-inf"), cache_modifier=".cg").to(tl.float32)
        _route(logits, cols, 0, ids_in_ptr, ids_ptr, weights_ptr, N, scaling, TOP_K, E_BLOCK, KB, GIVEN, SIGMOID,
               NORMALIZE, ACCURATE)
        tl.store(counter, 0)  # every block has counted: a plain store, as in the expert kernels


@triton.jit
def _weight_step(w_ptr, rows, row_ok, start, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows ``rows`` of W [N, K], columns ``start .. start + BLOCK_K`` (zeros past either end)."""
    cols = start + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :],
                   other=0.0)


@triton.jit
def linear_decode_kernel(x_ptr, w_ptr, b_ptr, out_ptr, partial_ptr, counters_ptr, ids_in_ptr, ids_ptr, weights_ptr,
                         scaling, pack_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, STEPS: tl.constexpr, BIAS: tl.constexpr,
                         ROUTE: tl.constexpr = False, TOP_K: tl.constexpr = 1, E_BLOCK: tl.constexpr = 1,
                         KB: tl.constexpr = 1, GIVEN: tl.constexpr = False, SIGMOID: tl.constexpr = False,
                         NORMALIZE: tl.constexpr = False, ACCURATE: tl.constexpr = True,
                         PACK_BITS: tl.constexpr = 0,
                         PACK_C: tl.constexpr = 0, PACK_BLOCK: tl.constexpr = 1024, PDL: tl.constexpr = False):
    """One token through a linear layer, ``out = W x (+ b)`` for W [N, K] row-major: program
    (block, piece) sums rows ``block * BLOCK_N ..`` over K slice ``piece`` (``STEPS`` steps of
    ``BLOCK_K``) in float32. With SPLIT slices each writes its sums to ``partial`` [SPLIT, N] and
    the last of a row block's programs (an acq_rel counter, reset by it) adds them in slice order
    and stores the block: deterministic, whichever program comes last. ROUTE (a router): the last
    row block then routes the token from the logits (:func:`_route`), counter ``BLOCKS``.
    PACK_BITS (a router before an int4, int3 or int2 expert step): the programs also write x as
    that step's packed activation vector of ``PACK_C`` chunks into ``pack`` (the step's own
    packing launch's pieces of ``PACK_BLOCK`` values, one program each, the first programs first).
    PDL: the weights' first step is loaded before the wait for the launch before."""
    _let_next_start(PDL)
    block = tl.program_id(0)
    piece = tl.program_id(1)
    BLOCKS: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    first = piece * (STEPS * BLOCK_K)
    w_first = _weight_step(w_ptr, rows, row_ok, first, K, BLOCK_K)  # constant: before the wait
    _await_previous(PDL)
    if PACK_BITS != 0:
        for pack_piece in range(block * SPLIT + piece, (K + PACK_BLOCK - 1) // PACK_BLOCK, BLOCKS * SPLIT):
            _pack_item(pack_piece, x_ptr, pack_ptr, K, PACK_C, PACK_BITS, PACK_BLOCK)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for step in tl.static_range(STEPS):
        cols = first + step * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        if step == 0:
            w = w_first
        else:
            w = _weight_step(w_ptr, rows, row_ok, first + step * BLOCK_K, K, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    sums = tl.sum(acc, axis=1)
    if SPLIT == 1:
        _linear_rows(out_ptr, b_ptr, rows, row_ok, sums, BIAS)
        if ROUTE:
            _route_when_last(out_ptr, counters_ptr + BLOCKS, ids_in_ptr, ids_ptr, weights_ptr, scaling, N, BLOCKS,
                             TOP_K, E_BLOCK, KB, GIVEN, SIGMOID, NORMALIZE, ACCURATE)
    else:
        tl.store(partial_ptr + piece * N + rows, sums, mask=row_ok)
        tl.debug_barrier()  # every thread's stores happen before the release below
        counter = counters_ptr + block
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT - 1:
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for p in tl.static_range(SPLIT):  # in slice order: deterministic; unrolled, all loads in flight
                total += tl.load(partial_ptr + p * N + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            _linear_rows(out_ptr, b_ptr, rows, row_ok, total, BIAS)
            tl.store(counter, 0)
            if ROUTE:
                _route_when_last(out_ptr, counters_ptr + BLOCKS, ids_in_ptr, ids_ptr, weights_ptr, scaling, N,
                                 BLOCKS, TOP_K, E_BLOCK, KB, GIVEN, SIGMOID, NORMALIZE, ACCURATE)


@triton.jit
def combine_kernel(rows_ptr, weights_ptr, order_ptr, out_ptr, H, K: tl.constexpr, KB: tl.constexpr,
                   BLOCK: tl.constexpr, ORDERED: tl.constexpr, PDL: tl.constexpr = False):
    """One token's routed output, columns ``program_id * BLOCK ..``: the sum over its ``K`` expert
    rows (``rows`` [K, H]; unless ORDERED, row i belongs to router slot ``order[i]``) of each row
    times its router weight rounded to the rows' dtype (as torch's product is), in router order
    in float32, rounded once at the end."""
    _chain(PDL)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    ty = out_ptr.dtype.element_ty
    if not ORDERED:
        slots = tl.arange(0, KB)
        order = tl.load(order_ptr + slots, mask=slots < K, other=-1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(K):
        if ORDERED:
            i = j
        else:
            i = tl.sum(tl.where(order == j, slots, 0), axis=0)  # the row of router slot j
        w = tl.load(weights_ptr + j).to(tl.float32)
        row = tl.load(rows_ptr + i * H + cols, mask=mask, other=0.0).to(tl.float32)
        acc += rounded(row * w, ty)
    tl.store(out_ptr + cols, rounded(acc, ty).to(ty), mask=mask)


@triton.jit
def group_plan_kernel(ids_ptr, x_ptr, order_ptr, ends_ptr, rows_ptr, H, E, K: tl.constexpr, KB: tl.constexpr,
                      EB: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """A decoded token's grouped-GEMM plan from its expert ids [K]: ``rows`` [K, H] (K copies of
    x [H], columns ``program_id * BLOCK ..``), and from program 0 ``order`` [K] (the stable sort of
    the ids: the router slot of each sorted position) and ``ends`` [E] (int32: how many ids are at
    most g, the end of expert g's rows)."""
    _chain(PDL)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + cols, mask=cols < H)
    for j in tl.static_range(K):
        tl.store(rows_ptr + j * H + cols, x, mask=cols < H)
    if tl.program_id(0) == 0:
        slots = tl.arange(0, KB)
        valid = slots < K
        ids = tl.load(ids_ptr + slots, mask=valid, other=0)
        # rank of slot j (rows): the ids below it, and equal ones in earlier slots (a stable sort)
        before = (ids[None, :] < ids[:, None]) | ((ids[None, :] == ids[:, None]) & (slots[None, :] < slots[:, None]))
        rank = tl.sum((before & valid[None, :]).to(tl.int32), axis=1)
        tl.store(order_ptr + rank, slots.to(tl.int64), mask=valid)
        groups = tl.arange(0, EB)
        ends = tl.sum(((ids[None, :] <= groups[:, None]) & valid[None, :]).to(tl.int32), axis=1)
        tl.store(ends_ptr + groups, ends, mask=groups < E)
