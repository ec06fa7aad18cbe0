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

With ``PACKED`` (int4, int3 and int2, ``LaunchConfig.packed``) the activations come instead as
packed activation vectors (:func:`_pack_chunks`): float16x2 pairs prescaled per chunk of one
16-byte weight vector (int3: 24 bytes), written once per step by :func:`_pack_input_kernel` (the
input) and by gate_up's finisher (``h``), and each chunk runs through one chain of packed float16
FMAs (:func:`_packed_step`); docs/kernels.md, "Packed activation vectors".

Each program's work is an item function (:func:`_pack_item`, :func:`_gate_up_item`,
:func:`_down_item`) that the kernels above call with their program ids. ``_step_kernel``
(``LaunchConfig.one_launch``: the long int8, int4 and int2/g64 steps by default) runs all of a
step's items in one launch, in the order of tickets taken from an atomic counter, each waiting for
what it reads. With ``PRELOAD`` (``LaunchConfig.preload``) an item loads its first step of weights
before that wait (:func:`_await`), so they are in flight while the phase before finishes.
"""

import triton
import triton.language as tl

try:  # Triton >= 3.4: programmatic dependent launch (LaunchConfig.pdl)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton: LaunchConfig.pdl is ignored (triton_experts.pdl_supported)
    gdc_launch_dependents = gdc_wait = None

from dymoe.quant.kernels.triton_experts import (_bias, _code_value, _expert_slot, _glu, _group_terms, _live,
                                                 _row_scales, _sum_experts, _unit_tile, globaltimer, smid)


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
def _int4_fma8(words, p0, p1, p2, p3, acc):
    """``acc`` plus, per int4 word (codes c0..c7 in nibbles 0..7), ``sum_j c_j * x_j`` in two
    float16 halves of a uint32, from the activation pairs of :func:`_pack_chunks`.

    Masking a word with 0x000F000F leaves codes 0 and 4 as the raw bits of two float16 subnormals
    (``c * 2**-24``), with 0x00F000F0 codes 1 and 5 as ``16c * 2**-24`` (their pairs carry the 1/16),
    and the same two masks after one shift by 8 give codes 2, 6 and 3, 7: four ANDs, one shift and
    four packed FMAs (``fma.rn.f16x2``, subnormals kept) for 8 codes, chained through ``acc`` over
    a chunk's four words."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, w, a;
        and.b32 t, $1, 0x000F000F;
        fma.rn.f16x2 a, t, $2, $6;
        and.b32 t, $1, 0x00F000F0;
        fma.rn.f16x2 a, t, $3, a;
        shr.b32 w, $1, 8;
        and.b32 t, w, 0x000F000F;
        fma.rn.f16x2 a, t, $4, a;
        and.b32 t, w, 0x00F000F0;
        fma.rn.f16x2 $0, t, $5, a;
        }""",
        constraints="=r,r,r,r,r,r,r", args=[words, p0, p1, p2, p3, acc], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _int2_fma16(words, p0, p1, p2, p3, p4, p5, p6, p7, acc):
    """:func:`_int4_fma8` for int2 words (codes c0..c15 at bits 2j): masks 0x00030003 << 2n leave
    codes n and n + 8 as ``4**n c * 2**-24`` for n = 0..4 (bits 0..9, the float16 mantissa), one
    shift by 10 brings codes 5..7 and 13..15 down: 8 ANDs, one shift, 8 packed FMAs for 16 codes."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, w, a;
        and.b32 t, $1, 0x00030003;
        fma.rn.f16x2 a, t, $2, $10;
        and.b32 t, $1, 0x000C000C;
        fma.rn.f16x2 a, t, $3, a;
        and.b32 t, $1, 0x00300030;
        fma.rn.f16x2 a, t, $4, a;
        and.b32 t, $1, 0x00C000C0;
        fma.rn.f16x2 a, t, $5, a;
        and.b32 t, $1, 0x03000300;
        fma.rn.f16x2 a, t, $6, a;
        shr.b32 w, $1, 10;
        and.b32 t, w, 0x00030003;
        fma.rn.f16x2 a, t, $7, a;
        and.b32 t, w, 0x000C000C;
        fma.rn.f16x2 a, t, $8, a;
        and.b32 t, w, 0x00300030;
        fma.rn.f16x2 $0, t, $9, a;
        }""",
        constraints="=r,r,r,r,r,r,r,r,r,r,r", args=[words, p0, p1, p2, p3, p4, p5, p6, p7, acc], dtype=tl.uint32,
        is_pure=True, pack=1)


_INT3_ASM = """{
        .reg .b32 t, x, a;
        prmt.b32 x, $1, $2, %s;
        and.b32 t, x, 0x00070007;
        fma.rn.f16x2 a, t, $3, $11;
        and.b32 t, x, 0x00380038;
        fma.rn.f16x2 a, t, $4, a;
        and.b32 t, x, 0x01C001C0;
        fma.rn.f16x2 a, t, $5, a;
        prmt.b32 x, $1, $2, %s;
        and.b32 t, x, 0x000E000E;
        fma.rn.f16x2 a, t, $6, a;
        and.b32 t, x, 0x00700070;
        fma.rn.f16x2 a, t, $7, a;
        and.b32 t, x, 0x03800380;
        fma.rn.f16x2 a, t, $8, a;
        prmt.b32 x, $1, $2, %s;
        and.b32 t, x, 0x001C001C;
        fma.rn.f16x2 a, t, $9, a;
        and.b32 t, x, 0x00E000E0;
        fma.rn.f16x2 $0, t, $10, a;
        }"""


def _int3_selectors(base: int) -> tuple[int, int, int]:
    """``prmt`` selectors (nibble k picks byte k of the result among bytes 0-3 of the first word and
    4-7 of the second) of the three float16x2 views [A0 A1 B0 B1], [A1 A2 B1 B2], [A2 A2 B2 B2] of
    two 3-byte groups A (from byte ``base``) and B (the 3 bytes after it). A chunk's word pairs
    (w0, w1) and (w3, w4) hold their groups from byte 0, (w1, w2) and (w4, w5) from byte 2."""
    views = ((0, 1, 3, 4), (1, 2, 4, 5), (2, 2, 5, 5))
    return tuple(sum((base + i) << (4 * k) for k, i in enumerate(view)) for view in views)


_INT3_FIRST: tl.constexpr = tl.constexpr(_INT3_ASM % tuple(map(hex, _int3_selectors(0))))
_INT3_SECOND: tl.constexpr = tl.constexpr(_INT3_ASM % tuple(map(hex, _int3_selectors(2))))
_X0, _Y0, _Z0 = (tl.constexpr(sel) for sel in _int3_selectors(0))  # for the interpreter's emulation
_X2, _Y2, _Z2 = (tl.constexpr(sel) for sel in _int3_selectors(2))


@triton.jit
def _int3_fma16(wa, wb, p0, p1, p2, p3, p4, p5, p6, p7, acc, SECOND: tl.constexpr):
    """:func:`_int4_fma8` for 16 int3 codes: two 3-byte groups A and B (8 codes each, code j at bits
    3j) of the words ``wa``, ``wb`` (at byte 0 of the pair, or with ``SECOND`` at byte 2). Three byte
    permutes give float16x2 views [A0 A1 | B0 B1], [A1 A2 | B1 B2], [A2 | B2] in which codes j of A
    and B sit at the same bits 3j mod 8 (codes 0-2, 3-5, 6-7), so one AND each leaves them as
    ``2**(3j mod 8) c * 2**-24`` (below 2**10: exact subnormals): 3 PRMT, 8 ANDs and 8 packed FMAs for
    16 codes, pair n carrying 2**-(3n mod 8)."""
    if SECOND:
        out = tl.inline_asm_elementwise(
            asm=_INT3_SECOND, constraints="=r,r,r,r,r,r,r,r,r,r,r,r",
            args=[wa, wb, p0, p1, p2, p3, p4, p5, p6, p7, acc], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        out = tl.inline_asm_elementwise(
            asm=_INT3_FIRST, constraints="=r,r,r,r,r,r,r,r,r,r,r,r",
            args=[wa, wb, p0, p1, p2, p3, p4, p5, p6, p7, acc], dtype=tl.uint32, is_pure=True, pack=1)
    return out


@triton.jit
def _prmt(a, b, SEL: tl.constexpr):
    """``prmt.b32 d, a, b, SEL`` in Triton (for the interpreter): byte k of d is byte ``SEL >> 4k & 7``
    of the 8 bytes of (a, b)."""
    out = a * 0
    for k in tl.static_range(4):
        i: tl.constexpr = (SEL >> (4 * k)) & 7
        if i < 4:
            byte = (a >> (8 * i)) & 0xFF
        else:
            byte = (b >> (8 * (i - 4))) & 0xFF
        out = out | (byte << (8 * k))
    return out


@triton.jit
def _f16_bits(bits):
    """The low 16 bits of uint32 ``bits`` as a float16 value, in float32."""
    return (bits & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _half_fma(t, p, acc):
    """One half of ``fma.rn.f16x2``: float16 ``t * p + acc`` of the low 16 bits of each, as uint32
    bits. The product of a masked code (a subnormal, ``t * 2**-24``) and an activation is exact in
    float32, so the sum rounds there and then once more to float16 (the hardware rounds once; the
    two differ only on rare ties)."""
    out = (t & 0xFFFF).to(tl.float32) * 5.9604644775390625e-08 * _f16_bits(p) + _f16_bits(acc)
    return out.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _hfma2(t, p, acc):
    """``fma.rn.f16x2 d, t, p, acc`` for Triton's interpreter, which runs no inline assembly: both
    float16 halves rounded as the GPU rounds them, so the CPU tests see the packed path's error."""
    return _half_fma(t, p, acc) | (_half_fma(t >> 16, p >> 16, acc >> 16) << 16)


@triton.jit
def _pair(at, n: tl.constexpr, c_ok):
    """Activation pair ``n`` of a word (``at``: the word's pairs, [CH] pointers), as a [1, CH] uint32."""
    return tl.load(at + n, mask=c_ok, other=0).to(tl.uint32, bitcast=True)[None, :]


@triton.jit
def _int4_word(words, p0, p1, p2, p3, acc, ASM: tl.constexpr):
    """:func:`_int4_fma8`, or without ``ASM`` (Triton's interpreter) the same chain of FMAs emulated."""
    if ASM:
        acc = _int4_fma8(words, p0, p1, p2, p3, acc)
    else:
        high = words >> 8
        acc = _hfma2(words & 0x000F000F, p0, acc)
        acc = _hfma2(words & 0x00F000F0, p1, acc)
        acc = _hfma2(high & 0x000F000F, p2, acc)
        acc = _hfma2(high & 0x00F000F0, p3, acc)
    return acc


@triton.jit
def _int2_word(words, p0, p1, p2, p3, p4, p5, p6, p7, acc, ASM: tl.constexpr):
    """:func:`_int2_fma16`, or its emulation (see :func:`_int4_word`)."""
    if ASM:
        acc = _int2_fma16(words, p0, p1, p2, p3, p4, p5, p6, p7, acc)
    else:
        high = words >> 10
        acc = _hfma2(words & 0x00030003, p0, acc)
        acc = _hfma2(words & 0x000C000C, p1, acc)
        acc = _hfma2(words & 0x00300030, p2, acc)
        acc = _hfma2(words & 0x00C000C0, p3, acc)
        acc = _hfma2(words & 0x03000300, p4, acc)
        acc = _hfma2(high & 0x00030003, p5, acc)
        acc = _hfma2(high & 0x000C000C, p6, acc)
        acc = _hfma2(high & 0x00300030, p7, acc)
    return acc


@triton.jit
def _int3_word(wa, wb, p0, p1, p2, p3, p4, p5, p6, p7, acc, SECOND: tl.constexpr, ASM: tl.constexpr):
    """:func:`_int3_fma16`, or its emulation (see :func:`_int4_word`)."""
    if ASM:
        acc = _int3_fma16(wa, wb, p0, p1, p2, p3, p4, p5, p6, p7, acc, SECOND)
    else:
        if SECOND:
            x, y, z = _prmt(wa, wb, _X2), _prmt(wa, wb, _Y2), _prmt(wa, wb, _Z2)
        else:
            x, y, z = _prmt(wa, wb, _X0), _prmt(wa, wb, _Y0), _prmt(wa, wb, _Z0)
        acc = _hfma2(x & 0x00070007, p0, acc)
        acc = _hfma2(x & 0x00380038, p1, acc)
        acc = _hfma2(x & 0x01C001C0, p2, acc)
        acc = _hfma2(y & 0x000E000E, p3, acc)
        acc = _hfma2(y & 0x00700070, p4, acc)
        acc = _hfma2(y & 0x03800380, p5, acc)
        acc = _hfma2(z & 0x001C001C, p6, acc)
        acc = _hfma2(z & 0x00E000E0, p7, acc)
    return acc


@triton.jit
def _word_dot(wg, wu, dot_g, dot_u, xq_ptr, c, c_ok, w: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
              TWO: tl.constexpr, wg_next=None, wu_next=None):
    """Word ``w`` of chunks ``c`` ([BLOCK_N, CH] words of gate and, with ``TWO``, up) times its
    activation pairs, added to the chunk sums ``dot_g``, ``dot_u``. The pairs are 4-byte loads of
    [CH] tensors, not one vector: a 1-D load takes the layout of its use, while splitting a vector
    load would move the pairs to that layout through shared memory and a barrier per word.
    int3's "word" ``w`` is 16 codes in two 32-bit words (``wg``, ``wg_next``: words 3w/2 and the
    next of the chunk's 6)."""
    P: tl.constexpr = 8 if BITS == 3 else 16 // BITS  # pairs per word (int3: per 16 codes)
    at = xq_ptr + c * (4 * P) + w * P
    p0, p1, p2, p3 = _pair(at, 0, c_ok), _pair(at, 1, c_ok), _pair(at, 2, c_ok), _pair(at, 3, c_ok)
    if BITS == 4:
        dot_g = _int4_word(wg, p0, p1, p2, p3, dot_g, ASM)
        if TWO:
            dot_u = _int4_word(wu, p0, p1, p2, p3, dot_u, ASM)
    elif BITS == 3:
        p4, p5, p6, p7 = _pair(at, 4, c_ok), _pair(at, 5, c_ok), _pair(at, 6, c_ok), _pair(at, 7, c_ok)
        dot_g = _int3_word(wg, wg_next, p0, p1, p2, p3, p4, p5, p6, p7, dot_g, w % 2 == 1, ASM)
        if TWO:
            dot_u = _int3_word(wu, wu_next, p0, p1, p2, p3, p4, p5, p6, p7, dot_u, w % 2 == 1, ASM)
    else:
        p4, p5, p6, p7 = _pair(at, 4, c_ok), _pair(at, 5, c_ok), _pair(at, 6, c_ok), _pair(at, 7, c_ok)
        dot_g = _int2_word(wg, p0, p1, p2, p3, p4, p5, p6, p7, dot_g, ASM)
        if TWO:
            dot_u = _int2_word(wu, p0, p1, p2, p3, p4, p5, p6, p7, dot_u, ASM)
    return dot_g, dot_u


@triton.jit
def _fma_value(acc):
    """A chunk's sum from :func:`_word_dot` as float32: both float16 halves added."""
    return _f16_bits(acc) + _f16_bits(acc >> 16)


@triton.jit
def _chunk_words(w_ptr, w_base, rows, row_ok, k0, ROW: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr,
                 BLOCK_N: tl.constexpr, SUB_K: tl.constexpr):
    """The packing words of rows ``rows`` from column ``k0``, as chunks of 4 words (32 int4 or
    64 int2 codes): four [BLOCK_N, CH] uint32 tensors, word i of each chunk in the i-th. A thread's
    16-byte vector is one chunk of one row, so the split stays in registers (no shared memory in
    the sm_90 code)."""
    CH: tl.constexpr = SUB_K * BITS // 128
    units = _units(w_ptr, w_base, rows, row_ok, k0, ROW, KP, BITS, 32 // BITS, SUB_K)
    a, b = tl.split(tl.reshape(units, (BLOCK_N, CH, 2, 2)))
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def _int3_words(w_ptr, w_base, rows, row_ok, c, ROW: tl.constexpr, KP: tl.constexpr):
    """int3 rows ``rows`` (``ROW`` 32-bit words each), chunks ``c`` of 64 codes (6 words, 8 of
    their 3-byte groups): six [BLOCK_N, CH] uint32 tensors, word i of each chunk in the i-th, loaded
    as three 8-byte vectors per chunk (a chunk is 24 bytes: 8-byte aligned, not 16). The addresses
    are built [chunks, rows] and the words transposed in registers: Triton lays a load out by its
    addresses, and [rows, chunks] gave each thread one row (a warp's load then read 8 bytes from
    each of 32 rows, and each thread loaded every activation pair once per chunk); this way a
    warp's threads share a row's chunks, as int4's and int2's do (Mixtral int3/g128 157 -> 125 us
    on an H100, docs/kernels.md)."""
    mask = ((c[:, None] < KP // 64) & row_ok[None, :])[:, :, None]
    at = w_ptr + w_base + 6 * c[:, None, None] + rows[None, :, None] * ROW + tl.arange(0, 2)[None, None, :]
    t0, t1 = tl.split(tl.load(at, mask=mask, other=0).to(tl.uint32, bitcast=True))
    t2, t3 = tl.split(tl.load(at + 2, mask=mask, other=0).to(tl.uint32, bitcast=True))
    t4, t5 = tl.split(tl.load(at + 4, mask=mask, other=0).to(tl.uint32, bitcast=True))
    return tl.trans(t0), tl.trans(t1), tl.trans(t2), tl.trans(t3), tl.trans(t4), tl.trans(t5)


@triton.jit
def _pack_chunks(v, c0, out_ptr, C: tl.constexpr, NCH: tl.constexpr, BITS: tl.constexpr):
    """Write chunks ``c0 .. c0 + NCH`` of a packed activation vector from ``v`` [NCH * V] (float32).

    A chunk is the V values of 4 packing words (int4: 32, int2: 64; int3: 64, its "words" being
    16 codes in two 3-byte groups); word w holds 2P of them (P = 16 / BITS codes in each 16-bit
    half; int3: P = 8, the two groups). A packed vector of ``C`` chunks is ``C * (4P + 2)`` 32-bit
    words: per chunk and word w the P float16x2 pairs ``(x[2Pw + n], x[2Pw + P + n])`` (values of
    chunk c), times the chunk's scale and the pair's mask factor (:func:`_int4_fma8`:
    16**-(n % 2); :func:`_int2_fma16`: 4**-n, then 4**-(n - 5); :func:`_int3_fma16`:
    2**-(3n % 8)), at ``4Pc + Pw + n``; then per chunk ``2**24 / scale`` (float32) at ``4PC + c``
    and the sum of its values at ``(4P + 1)C + c``. The scale is the power of two that brings the chunk's largest
    value into [2**14, 2**15): float16 keeps each value with 11 bits and its products with the
    codes are normal numbers that cannot overflow in a chunk's sum."""
    P: tl.constexpr = 8 if BITS == 3 else 16 // BITS
    chunks = tl.reshape(v, (NCH, 8 * P))
    amax = tl.max(tl.abs(chunks), axis=1)
    asum = tl.sum(chunks, axis=1)
    scale = tl.exp2(14.0 - tl.floor(tl.log2(tl.maximum(amax, 1e-30))))
    n = tl.arange(0, P)
    if BITS == 4:
        shift = (n % 2) * 4
    elif BITS == 3:
        shift = (3 * n) % 8
    else:
        shift = tl.where(n < 5, n, n - 5) * 2
    factor = 1.0 / (1 << shift).to(tl.float32)
    scaled = tl.reshape(v, (NCH, 4, 2, P)) * scale[:, None, None, None] * factor[None, None, None, :]
    bits = scaled.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)  # [chunk, word, half, pair]
    lo, hi = tl.split(tl.permute(bits, (0, 1, 3, 2)))
    pairs = (lo | (hi << 16)).to(tl.int32, bitcast=True)  # [chunk, word, pair]
    c = c0 + tl.arange(0, NCH)
    c_ok = c < C
    w = tl.arange(0, 4)
    tl.store(out_ptr + c[:, None, None] * (4 * P) + w[None, :, None] * P + n[None, None, :], pairs,
             mask=c_ok[:, None, None])
    tl.store(out_ptr + 4 * P * C + c, (16777216.0 / scale).to(tl.int32, bitcast=True), mask=c_ok)
    tl.store(out_ptr + (4 * P + 1) * C + c, asum.to(tl.int32, bitcast=True), mask=c_ok)


@triton.jit
def _pack_input_kernel(x_ptr, out_ptr, H: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
    """The one token's input ``x`` [H] as a packed activation vector (:func:`_pack_chunks`).
    ``PDL``: let the gate_up launch start at once (it waits for this one before reading ``out``).
    ``EARLY``: this launch itself may start before the launch before it ends (the step's first
    launch, :func:`~dymoe.quant.kernels.triton_experts.EARLY_STEP`): it waits for that one first,
    and only then lets gate_up start, since gate_up reads the router's expert ids before its wait."""
    if EARLY:
        gdc_wait()
    if PDL:
        gdc_launch_dependents()
    _pack_item(tl.program_id(0), x_ptr, out_ptr, H, C, BITS, BLOCK)


@triton.jit
def _pack_item(piece, x_ptr, out_ptr, H: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Values ``piece * BLOCK ..`` of ``x`` into their chunks of the packed activation vector."""
    k = piece * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + k, mask=k < H, other=0.0).to(tl.float32)
    V: tl.constexpr = 64 if BITS == 3 else 128 // BITS
    _pack_chunks(v, piece * (BLOCK // V), out_ptr, C, BLOCK // V, BITS)


@triton.jit
def _packed_terms(acc, dot, s_ptr, s_base, m_base, rows, row_ok, k0, c, back, asum, GROUPS: tl.constexpr,
                  GROUP: tl.constexpr, CPG: tl.constexpr, ONE: tl.constexpr):
    """``acc`` [BLOCK_N, CH] plus the chunk sums: ``s * back * dot + m * asum`` with each chunk's
    group scale and min (``CPG`` chunks per group; ``ONE``: all of them in the group at ``k0``).
    They are loaded as [BLOCK_N, CH] (the same address across a group's chunks: L1 hits); the
    compiler then keeps ``acc`` in their layout and moves the sums there (one shared-memory round
    trip per step), where [BLOCK_N] loads went through shared memory twice."""
    if ONE:
        g = k0 // GROUP + c[None, :] * 0
    else:
        g = c[None, :] // CPG
    smask = row_ok[:, None] & (g < GROUPS)
    s = tl.load(s_ptr + s_base + rows[:, None] * GROUPS + g, mask=smask, other=0).to(tl.float32)
    m = tl.load(s_ptr + m_base + rows[:, None] * GROUPS + g, mask=smask, other=0).to(tl.float32)
    return acc + _fma_value(dot) * (s * back[None, :]) + m * asum[None, :]


@triton.jit
def _packed_words(w_ptr, gate_w, up_w, rows, row_ok, k0, ROW: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr,
                  BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, TWO: tl.constexpr):
    """The packing words one :func:`_packed_step` reads: gate's and (``TWO``) up's, each a tuple of
    [BLOCK_N, CH] uint32 (int3: 6 words per chunk, else 4)."""
    if BITS == 3:
        c = k0 // 64 + tl.arange(0, SUB_K // 64)
        gw = _int3_words(w_ptr, gate_w, rows, row_ok, c, ROW, KP)
        if TWO:
            uw = _int3_words(w_ptr, up_w, rows, row_ok, c, ROW, KP)
        else:
            uw = gw
    else:
        gw = _chunk_words(w_ptr, gate_w, rows, row_ok, k0, ROW, KP, BITS, BLOCK_N, SUB_K)
        if TWO:
            uw = _chunk_words(w_ptr, up_w, rows, row_ok, k0, ROW, KP, BITS, BLOCK_N, SUB_K)
        else:
            uw = gw
    return gw, uw


@triton.jit
def _packed_step(acc_g, acc_u, w_ptr, s_ptr, gate_w, gate_s, gate_m, up_w, up_s, up_m, rows, row_ok, k0, xq_ptr,
                 C: tl.constexpr, ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                 BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, GROUP: tl.constexpr, ASM: tl.constexpr,
                 TWO: tl.constexpr, words=None):
    """int4, int3 or int2 rows ``rows`` of one weight (``TWO``: gate and up, sharing the activations)
    times the packed activations of the ``SUB_K`` columns from ``k0`` (whole groups of ``GROUP``):
    each thread runs each of its chunks (one row's 16-byte vector; int3: 24 bytes) through one chain
    of packed FMAs and converts once per chunk; ``acc`` is per chunk. A call covers all of a
    block_k step's groups with ``BLOCK_STEPS`` (``LaunchConfig.block_steps``), else one group, as in
    the float32 path: there a 64-value group reads each row in 32-byte pieces (int4) per call, and
    the packed int4/g64 step measured 1.35-1.8x the time of g128 on an H100. ``words``: the
    step's :func:`_packed_words`, loaded ahead (``PRELOAD``), else loaded here."""
    V: tl.constexpr = 64 if BITS == 3 else 128 // BITS  # values per chunk
    CH: tl.constexpr = SUB_K // V
    c = k0 // V + tl.arange(0, CH)
    c_ok = c < C
    dot_g = tl.zeros((BLOCK_N, CH), dtype=tl.uint32)  # two float16 halves
    dot_u = dot_g
    if words is None:
        words = _packed_words(w_ptr, gate_w, up_w, rows, row_ok, k0, ROW, KP, BITS, BLOCK_N, SUB_K, TWO)
    gw, uw = words
    if BITS == 3:  # 4 "words" of 16 codes: word pairs (0, 1), (1, 2), (3, 4), (4, 5) of the chunk's 6
        g0, g1, g2, g3, g4, g5 = gw
        u0, u1, u2, u3, u4, u5 = uw
        dot_g, dot_u = _word_dot(g0, u0, dot_g, dot_u, xq_ptr, c, c_ok, 0, BITS, ASM, TWO, g1, u1)
        dot_g, dot_u = _word_dot(g1, u1, dot_g, dot_u, xq_ptr, c, c_ok, 1, BITS, ASM, TWO, g2, u2)
        dot_g, dot_u = _word_dot(g3, u3, dot_g, dot_u, xq_ptr, c, c_ok, 2, BITS, ASM, TWO, g4, u4)
        dot_g, dot_u = _word_dot(g4, u4, dot_g, dot_u, xq_ptr, c, c_ok, 3, BITS, ASM, TWO, g5, u5)
    else:
        g0, g1, g2, g3 = gw
        u0, u1, u2, u3 = uw
        dot_g, dot_u = _word_dot(g0, u0, dot_g, dot_u, xq_ptr, c, c_ok, 0, BITS, ASM, TWO)
        dot_g, dot_u = _word_dot(g1, u1, dot_g, dot_u, xq_ptr, c, c_ok, 1, BITS, ASM, TWO)
        dot_g, dot_u = _word_dot(g2, u2, dot_g, dot_u, xq_ptr, c, c_ok, 2, BITS, ASM, TWO)
        dot_g, dot_u = _word_dot(g3, u3, dot_g, dot_u, xq_ptr, c, c_ok, 3, BITS, ASM, TWO)
    P: tl.constexpr = 8 if BITS == 3 else 16 // BITS
    back = tl.load(xq_ptr + 4 * P * C + c, mask=c_ok, other=0).to(tl.float32, bitcast=True)
    asum = tl.load(xq_ptr + (4 * P + 1) * C + c, mask=c_ok, other=0).to(tl.float32, bitcast=True)
    acc_g = _packed_terms(acc_g, dot_g, s_ptr, gate_s, gate_m, rows, row_ok, k0, c, back, asum, GROUPS, GROUP,
                          GROUP // V, SUB_K == GROUP)
    if TWO:
        acc_u = _packed_terms(acc_u, dot_u, s_ptr, up_s, up_m, rows, row_ok, k0, c, back, asum, GROUPS, GROUP,
                              GROUP // V, SUB_K == GROUP)
    return acc_g, acc_u


@triton.jit
def _pair_step(acc_g, m_g, acc_u, m_u, w_ptr, s_ptr, gate_w, gate_s, gate_m, up_w, up_s, up_m, rows, row_ok,
               k0, a_ptr, a_cols, ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
               CPW: tl.constexpr, SUB_K: tl.constexpr, units=None):
    """Gate and up rows ``rows`` times ``a[k0 : k0 + SUB_K]``, both tiles loaded before any
    arithmetic (twice the bytes in flight of one) and each activation loaded once for both.
    ``units``: both tiles, loaded ahead (``PRELOAD``)."""
    if units is None:
        units = (_units(w_ptr, gate_w, rows, row_ok, k0, ROW, KP, BITS, CPW, SUB_K),
                 _units(w_ptr, up_w, rows, row_ok, k0, ROW, KP, BITS, CPW, SUB_K))
    units_g, units_u = units
    k = k0 + tl.arange(0, SUB_K // CPW) * CPW  # each word's first column
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
                 BITS: tl.constexpr, CPW: tl.constexpr, SUB_K: tl.constexpr, units=None):
    """Rows ``rows`` of one weight times ``a[k0 : k0 + SUB_K]``, where the activations come
    transposed by code position (:func:`_transposed`), so the values a thread needs for code ``j``
    of its consecutive words are consecutive floats: one vector load, no conversion. ``units``:
    the tile, loaded ahead (``PRELOAD``)."""
    if units is None:
        units = _units(w_ptr, w_base, rows, row_ok, k0, ROW, KP, BITS, CPW, SUB_K)
    words = k0 // CPW + tl.arange(0, SUB_K // CPW)
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
def _k_slice(active, piece, KP: tl.constexpr, K_SLICE: tl.constexpr):
    """K slice ``piece``'s input columns [start, end) (empty for an expert no token uses)."""
    start = piece * K_SLICE
    end = tl.minimum(start + K_SLICE, KP)
    return start, tl.where(active, end, start)


@triton.jit
def _store_hidden(h_ptr, e, block, rows, row_ok, h, KP_DOWN: tl.constexpr, CPW: tl.constexpr, BITS: tl.constexpr,
                  BLOCK_N: tl.constexpr, PACKED: tl.constexpr, C_H: tl.constexpr):
    """Write rows ``rows`` of expert ``e``'s ``h`` for the down kernel: float32 transposed by code
    position, or (PACKED) as chunks of expert e's packed activation vector (:func:`_pack_chunks`;
    a block's rows are whole chunks, rows past I written as zeros)."""
    if PACKED:
        V: tl.constexpr = 64 if BITS == 3 else 128 // BITS
        _pack_chunks(tl.where(row_ok, h, 0.0), block * (BLOCK_N // V), h_ptr + e * ((V // 2 + 2) * C_H), C_H,
                     BLOCK_N // V, BITS)
    else:
        tl.store(h_ptr + e * KP_DOWN + _transposed(rows, KP_DOWN, CPW), h, mask=row_ok)


# The traced step (``TRACE``, ``launch_decode(trace=)``, benchmarks/step_timeline.py): each program
# writes TRACE_FIELDS int64 to its row of the trace buffer (row (e * row blocks + block) * slices +
# slice): 0 the global timer (ns) at its start, 1 when its wait returned, 2 when its sums were done
# (before its stores), 3 when its counter's atomic returned, 4 (the finisher only, else 0) when the
# finisher's stores were issued, 5 its SM.
TRACE_FIELDS = tl.constexpr(8)


@triton.jit
def _stamp(trace_ptr, POINT: tl.constexpr):
    """The global timer into field ``POINT`` of this program's trace row (every thread stores
    its reading; one of them lands)."""
    tl.store(trace_ptr + POINT, globaltimer())


@triton.jit
def _trace_row(trace_ptr):
    """This program's row of a split-K launch's trace buffer, its start and its SM written."""
    row = trace_ptr + ((tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2)
                       + tl.program_id(2)) * TRACE_FIELDS
    _stamp(row, 0)
    tl.store(row + 4, 0)  # (a finisher overwrites it; a stale stamp of the last replay must not stay)
    tl.store(row + 5, smid().to(tl.int64))
    return row


@triton.jit
def _await(PDL: tl.constexpr, SPIN: tl.constexpr, flag_ptr, target):
    """Wait until what an item reads is written: the launch before (``PDL``: griddepcontrol), or
    (``SPIN``, the one-launch step) until ``flag_ptr`` counts ``target`` (acquire)."""
    if PDL:
        gdc_wait()
    if SPIN:
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
        while seen < target:
            seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
        tl.debug_barrier()  # no thread reads before the acquire above


@triton.jit
def _gate_up_item(e, block, piece, blocks, w_ptr, s_ptr, offsets_ptr, ids_ptr, combine_ptr, x_ptr, h_ptr, gu_ptr,
                  counters_ptr, ready_ptr, E, H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                  GATE_W: tl.constexpr, GATE_S: tl.constexpr, GATE_M: tl.constexpr,
                  UP_W: tl.constexpr, UP_S: tl.constexpr, UP_M: tl.constexpr,
                  ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                  CPW: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, SUBS: tl.constexpr,
                  SPLIT: tl.constexpr, K_SLICE: tl.constexpr, KP_DOWN: tl.constexpr, PACKED: tl.constexpr,
                  BLOCK_STEPS: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr, C_IN: tl.constexpr,
                  C_H: tl.constexpr, GU_BIAS: tl.constexpr, ACT: tl.constexpr, LIMIT: tl.constexpr,
                  ALPHA: tl.constexpr, SIGNAL: tl.constexpr, PRELOAD: tl.constexpr, SPIN: tl.constexpr, flag_ptr,
                  flag_target, INDIRECT: tl.constexpr = False, TRACE: tl.constexpr = False, trace_ptr=None):
    """K slice ``piece`` of row block ``block`` (of ``blocks``) of expert ``e``'s gate and up
    projections; the last slice of the block to finish writes that block of ``h``. ``SIGNAL`` (the
    one-launch step, :func:`_step_kernel`): it then adds one to ``ready_ptr[e]`` (release), so the
    down items of expert e know when all of its ``h`` is written. The input is read only after
    :func:`_await`; with ``PRELOAD`` the slice's first step of weights is loaded before it."""
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < I
    w_slot, s_slot, _, c, active = _expert_slot(offsets_ptr, ids_ptr, combine_ptr, e, 1, E, W_BYTES, 2, INDIRECT)
    live = _live(rows, row_ok, active)
    gate_w, gate_s, gate_m = w_slot + GATE_W, s_slot + GATE_S, s_slot + GATE_M
    up_w, up_s, up_m = w_slot + UP_W, s_slot + UP_S, s_slot + UP_M
    V: tl.constexpr = 64 if BITS == 3 else 128 // BITS  # packed: values per chunk
    STEP: tl.constexpr = SUB_K * SUBS if BLOCK_STEPS else SUB_K  # packed: columns per _packed_step call
    width: tl.constexpr = STEP // V if PACKED else SUB_K // CPW  # accumulators per row: chunks or words
    acc_g = tl.zeros((BLOCK_N, width), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, width), dtype=tl.float32)
    m_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start, end = _k_slice(active, piece, KP, K_SLICE)
    if PRELOAD:  # the first step's weights in flight while waiting (one step: BLOCK_STEPS, or SUBS 1)
        first_ok = row_ok & (start < end)
        if PACKED:
            first = _packed_words(w_ptr, gate_w, up_w, rows, first_ok, start, ROW, KP, BITS, BLOCK_N, STEP, True)
        else:
            first = (_units(w_ptr, gate_w, rows, first_ok, start, ROW, KP, BITS, CPW, SUB_K),
                     _units(w_ptr, up_w, rows, first_ok, start, ROW, KP, BITS, CPW, SUB_K))
    # x, h, the scratch and counters only after the previous launch (or item) is done
    _await(PDL, SPIN, flag_ptr, flag_target)
    if TRACE:
        _stamp(trace_ptr, 1)
    if PDL:
        gdc_launch_dependents()
    if PRELOAD:
        if start < end:
            if PACKED:
                acc_g, acc_u = _packed_step(acc_g, acc_u, w_ptr, s_ptr, gate_w, gate_s, gate_m, up_w, up_s, up_m,
                                            rows, row_ok, start, x_ptr, C_IN, ROW, KP, GROUPS, BITS, BLOCK_N, STEP,
                                            SUB_K, ASM, True, first)
            else:
                acc_g, m_g, acc_u, m_u = _pair_step(acc_g, m_g, acc_u, m_u, w_ptr, s_ptr, gate_w, gate_s, gate_m,
                                                    up_w, up_s, up_m, rows, row_ok, start, x_ptr, H, ROW, KP, GROUPS,
                                                    BITS, CPW, SUB_K, first)
        start += SUB_K * SUBS
    for k0 in range(start, end, SUB_K * SUBS):
        if PACKED:  # x packed by _pack_input_kernel; one call per group, or (BLOCK_STEPS) per step
            for sub in tl.static_range(SUB_K * SUBS // STEP):
                acc_g, acc_u = _packed_step(acc_g, acc_u, w_ptr, s_ptr, gate_w, gate_s, gate_m, up_w, up_s, up_m, rows,
                                            row_ok, k0 + sub * STEP, x_ptr, C_IN, ROW, KP, GROUPS, BITS, BLOCK_N, STEP,
                                            SUB_K, ASM, True)
        else:
            for sub in tl.static_range(SUBS):  # several groups per step: more bytes in flight per block
                acc_g, m_g, acc_u, m_u = _pair_step(acc_g, m_g, acc_u, m_u, w_ptr, s_ptr, gate_w, gate_s, gate_m, up_w,
                                                    up_s, up_m, rows, row_ok, k0 + sub * SUB_K, x_ptr, H, ROW, KP,
                                                    GROUPS, BITS, CPW, SUB_K)
    gate = (tl.sum(acc_g, axis=1) + m_g) * _row_scales(s_ptr, gate_s, rows, live, BITS)
    up = (tl.sum(acc_u, axis=1) + m_u) * _row_scales(s_ptr, up_s, rows, live, BITS)
    weight = tl.sum(c, axis=0)  # one token: the routing column's only entry
    if TRACE:
        _stamp(trace_ptr, 2)
    if SPLIT == 1:
        gate += _bias(s_ptr, s_slot, GU_BIAS, rows, live)
        up += _bias(s_ptr, s_slot, GU_BIAS, rows + I, live)  # up's biases follow gate's
        _store_hidden(h_ptr, e, block, rows, row_ok, _glu(gate, up, ACT, LIMIT, ALPHA) * weight, KP_DOWN, CPW,
                      BITS, BLOCK_N, PACKED, C_H)
        if TRACE:
            _stamp(trace_ptr, 3)
            _stamp(trace_ptr, 4)
        if SIGNAL:
            tl.debug_barrier()  # every thread's h stores happen before the release below
            tl.atomic_add(ready_ptr + e, 1, sem="release")
    else:
        slices = gu_ptr + e * (SPLIT * 2 * I)
        tl.store(slices + piece * (2 * I) + rows, gate, mask=row_ok)
        tl.store(slices + piece * (2 * I) + I + rows, up, mask=row_ok)
        tl.debug_barrier()  # every thread's stores happen before the release below
        counter = counters_ptr + e * blocks + block
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if TRACE:
            _stamp(trace_ptr, 3)
        if arrived == SPLIT - 1:
            gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
            up = tl.zeros((BLOCK_N,), dtype=tl.float32)
            # in slice order, whichever program came last: deterministic; unrolled, so that all the
            # slices' loads are in flight at once (a loop waited for each one's L2 round trip in turn)
            for p in tl.static_range(SPLIT):
                gate += tl.load(slices + p * (2 * I) + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
                up += tl.load(slices + p * (2 * I) + I + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            gate += _bias(s_ptr, s_slot, GU_BIAS, rows, live)
            up += _bias(s_ptr, s_slot, GU_BIAS, rows + I, live)
            _store_hidden(h_ptr, e, block, rows, row_ok, _glu(gate, up, ACT, LIMIT, ALPHA) * weight, KP_DOWN, CPW,
                          BITS, BLOCK_N, PACKED, C_H)
            tl.store(counter, 0)  # every slice has counted: a plain store, no round trip to wait for
            if TRACE:
                _stamp(trace_ptr, 4)
            if SIGNAL:
                tl.debug_barrier()
                tl.atomic_add(ready_ptr + e, 1, sem="release")


@triton.jit
def _gate_up_split_kernel(w_ptr, s_ptr, offsets_ptr, ids_ptr, combine_ptr, x_ptr, h_ptr, gu_ptr, counters_ptr, E,
                          H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                          GATE_W: tl.constexpr, GATE_S: tl.constexpr, GATE_M: tl.constexpr,
                          UP_W: tl.constexpr, UP_S: tl.constexpr, UP_M: tl.constexpr,
                          ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                          CPW: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, SUBS: tl.constexpr,
                          SPLIT: tl.constexpr, K_SLICE: tl.constexpr, KP_DOWN: tl.constexpr,
                          PACKED: tl.constexpr = False, BLOCK_STEPS: tl.constexpr = False, ASM: tl.constexpr = True,
                          PDL: tl.constexpr = False, C_IN: tl.constexpr = 0,
                          C_H: tl.constexpr = 0, GU_BIAS: tl.constexpr = -1, ACT: tl.constexpr = 0,
                          LIMIT: tl.constexpr = 7.0, ALPHA: tl.constexpr = 1.702, PRELOAD: tl.constexpr = False,
                          INDIRECT: tl.constexpr = False, EARLY: tl.constexpr = False, TRACE: tl.constexpr = False,
                          trace_ptr=None):
    """Grid (experts, row blocks, K slices): one :func:`_gate_up_item` each. ``EARLY`` (the step's
    first launch, started before the launch before it ends): wait for that one before anything,
    the expert ids included (so no weights are loaded ahead). ``TRACE``: stamp ``trace_ptr``
    (:data:`TRACE_FIELDS` per program)."""
    if TRACE:
        trace_ptr = _trace_row(trace_ptr)
    if EARLY:
        gdc_wait()
    _gate_up_item(tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(1), w_ptr, s_ptr,
                  offsets_ptr, ids_ptr, combine_ptr, x_ptr, h_ptr, gu_ptr, counters_ptr, counters_ptr, E, H, I, W_BYTES,
                  GATE_W, GATE_S, GATE_M, UP_W, UP_S, UP_M, ROW, KP, GROUPS, BITS, CPW, BLOCK_N, SUB_K, SUBS, SPLIT,
                  K_SLICE, KP_DOWN, PACKED, BLOCK_STEPS, ASM, PDL, C_IN, C_H, GU_BIAS, ACT, LIMIT, ALPHA, False,
                  PRELOAD, False, counters_ptr, 0, INDIRECT=INDIRECT, TRACE=TRACE, trace_ptr=trace_ptr)


@triton.jit
def _down_item(e, block, piece, w_ptr, s_ptr, offsets_ptr, ids_ptr, combine_ptr, h_ptr, partial_ptr, out_ptr,
               counters_ptr, E, H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
               DOWN_W: tl.constexpr, DOWN_S: tl.constexpr, DOWN_M: tl.constexpr,
               ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
               CPW: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, SUBS: tl.constexpr,
               SPLIT: tl.constexpr, K_SLICE: tl.constexpr, PACKED: tl.constexpr, BLOCK_STEPS: tl.constexpr,
               ASM: tl.constexpr, PDL: tl.constexpr, C_H: tl.constexpr, D_BIAS: tl.constexpr,
               PRELOAD: tl.constexpr, SPIN: tl.constexpr, flag_ptr, flag_target, INDIRECT: tl.constexpr = False,
               TRACE: tl.constexpr = False, trace_ptr=None):
    """K slice ``piece`` of row block ``block`` of expert ``e``'s down projection, into its partial
    row; the last of the block's partials to land sums them (:func:`_sum_experts`). ``h`` is read
    only after :func:`_await`; with ``PRELOAD`` the slice's first step of weights is loaded before."""
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < H
    w_slot, s_slot, t, c, active = _expert_slot(offsets_ptr, ids_ptr, combine_ptr, e, 1, E, W_BYTES, 2, INDIRECT)
    live = _live(rows, row_ok, active)
    down_w, down_s, down_m = w_slot + DOWN_W, s_slot + DOWN_S, s_slot + DOWN_M
    V: tl.constexpr = 64 if BITS == 3 else 128 // BITS  # packed: values per chunk
    STEP: tl.constexpr = SUB_K * SUBS if BLOCK_STEPS else SUB_K  # packed: columns per _packed_step call
    acc = tl.zeros((BLOCK_N, STEP // V if PACKED else SUB_K // CPW), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start, end = _k_slice(active, piece, KP, K_SLICE)
    if PRELOAD:  # the first step's weights in flight while gate_up finishes
        first_ok = row_ok & (start < end)
        if PACKED:
            first = _packed_words(w_ptr, down_w, down_w, rows, first_ok, start, ROW, KP, BITS, BLOCK_N, STEP, False)
        else:
            first = _units(w_ptr, down_w, rows, first_ok, start, ROW, KP, BITS, CPW, SUB_K)
    _await(PDL, SPIN, flag_ptr, flag_target)  # h, the partials, the counters and out only after gate_up
    if TRACE:
        _stamp(trace_ptr, 1)
    if PRELOAD:
        if start < end:
            if PACKED:
                acc, _ = _packed_step(acc, acc, w_ptr, s_ptr, down_w, down_s, down_m, down_w, down_s, down_m, rows,
                                      row_ok, start, h_ptr + e * ((V // 2 + 2) * C_H), C_H, ROW, KP, GROUPS, BITS,
                                      BLOCK_N, STEP, SUB_K, ASM, False, first)
            else:
                acc, acc_m = _single_step(acc, acc_m, w_ptr, s_ptr, down_w, down_s, down_m, rows, row_ok, start,
                                          h_ptr + e * KP, I, ROW, KP, GROUPS, BITS, CPW, SUB_K, first)
        start += SUB_K * SUBS
    for k0 in range(start, end, SUB_K * SUBS):
        if PACKED:  # h packed by the gate_up kernel; one call per group, or (BLOCK_STEPS) per step
            for sub in tl.static_range(SUB_K * SUBS // STEP):
                acc, _ = _packed_step(acc, acc, w_ptr, s_ptr, down_w, down_s, down_m, down_w, down_s, down_m, rows,
                                      row_ok, k0 + sub * STEP, h_ptr + e * ((V // 2 + 2) * C_H), C_H, ROW, KP, GROUPS,
                                      BITS, BLOCK_N, STEP, SUB_K, ASM, False)
        else:
            for sub in tl.static_range(SUBS):
                acc, acc_m = _single_step(acc, acc_m, w_ptr, s_ptr, down_w, down_s, down_m, rows, row_ok,
                                          k0 + sub * SUB_K, h_ptr + e * KP, I, ROW, KP, GROUPS, BITS, CPW, SUB_K)
    out = (tl.sum(acc, axis=1) + acc_m) * _row_scales(s_ptr, down_s, rows, live, BITS)
    if D_BIAS >= 0:  # the router weight times the expert's bias, once (in the first slice's partial)
        first = (piece == 0).to(tl.float32)
        out += _bias(s_ptr, s_slot, D_BIAS, rows, live) * (tl.sum(c, axis=0) * first)
    if TRACE:
        _stamp(trace_ptr, 2)
    tl.store(partial_ptr + (e * SPLIT + piece) * H + rows, out, mask=row_ok)
    # partial row e * SPLIT + slice is "expert" e * SPLIT + slice of one token for the shared sum
    mask = row_ok[:, None] & (t[None, :] < 1)
    _sum_experts(partial_ptr, out_ptr, counters_ptr + block, rows, t, mask, 1, E * SPLIT, H, BLOCK_N, 2, TRACE,
                 trace_ptr)


@triton.jit
def _down_split_kernel(w_ptr, s_ptr, offsets_ptr, ids_ptr, combine_ptr, h_ptr, partial_ptr, out_ptr, counters_ptr, E,
                       H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                       DOWN_W: tl.constexpr, DOWN_S: tl.constexpr, DOWN_M: tl.constexpr,
                       ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr,
                       CPW: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, SUBS: tl.constexpr,
                       SPLIT: tl.constexpr, K_SLICE: tl.constexpr, PACKED: tl.constexpr = False,
                       BLOCK_STEPS: tl.constexpr = False, ASM: tl.constexpr = True, PDL: tl.constexpr = False,
                       C_H: tl.constexpr = 0, D_BIAS: tl.constexpr = -1, PRELOAD: tl.constexpr = False,
                       INDIRECT: tl.constexpr = False, TRACE: tl.constexpr = False, trace_ptr=None):
    """Grid (experts, row blocks, K slices): one :func:`_down_item` each (``TRACE``: as
    :func:`_gate_up_split_kernel`)."""
    if TRACE:
        trace_ptr = _trace_row(trace_ptr)
    _down_item(tl.program_id(0), tl.program_id(1), tl.program_id(2), w_ptr, s_ptr, offsets_ptr, ids_ptr, combine_ptr,
               h_ptr, partial_ptr, out_ptr, counters_ptr, E, H, I, W_BYTES, DOWN_W, DOWN_S, DOWN_M, ROW, KP, GROUPS,
               BITS, CPW, BLOCK_N, SUB_K, SUBS, SPLIT, K_SLICE, PACKED, BLOCK_STEPS, ASM, PDL, C_H, D_BIAS, PRELOAD,
               False, counters_ptr, 0, INDIRECT=INDIRECT, TRACE=TRACE, trace_ptr=trace_ptr)


@triton.jit
def _step_kernel(w_ptr, s_ptr, offsets_ptr, ids_ptr, combine_ptr, xin_ptr, x_ptr, h_ptr, gu_ptr, gu_counters_ptr,
                 partial_ptr, out_ptr, counters_ptr, step_ptr, E, H: tl.constexpr, I: tl.constexpr,
                 W_BYTES: tl.constexpr, GATE_W: tl.constexpr, GATE_S: tl.constexpr, GATE_M: tl.constexpr,
                 UP_W: tl.constexpr, UP_S: tl.constexpr, UP_M: tl.constexpr,
                 DOWN_W: tl.constexpr, DOWN_S: tl.constexpr, DOWN_M: tl.constexpr, BITS: tl.constexpr,
                 G_ROW: tl.constexpr, G_KP: tl.constexpr, G_GROUPS: tl.constexpr, G_CPW: tl.constexpr,
                 G_BLOCK_N: tl.constexpr, G_SUB_K: tl.constexpr, G_SUBS: tl.constexpr, G_SPLIT: tl.constexpr,
                 G_K_SLICE: tl.constexpr, G_BLOCKS: tl.constexpr,
                 D_ROW: tl.constexpr, D_KP: tl.constexpr, D_GROUPS: tl.constexpr, D_CPW: tl.constexpr,
                 D_BLOCK_N: tl.constexpr, D_SUB_K: tl.constexpr, D_SUBS: tl.constexpr, D_SPLIT: tl.constexpr,
                 D_K_SLICE: tl.constexpr, D_BLOCKS: tl.constexpr, KP_DOWN: tl.constexpr,
                 PACKED: tl.constexpr = False, BLOCK_STEPS: tl.constexpr = False, ASM: tl.constexpr = True,
                 C_IN: tl.constexpr = 0, C_H: tl.constexpr = 0,
                 GU_BIAS: tl.constexpr = -1, ACT: tl.constexpr = 0, LIMIT: tl.constexpr = 7.0,
                 ALPHA: tl.constexpr = 1.702, D_BIAS: tl.constexpr = -1, PACK_ITEMS: tl.constexpr = 0,
                 PACK_BLOCK: tl.constexpr = 1024, PRELOAD: tl.constexpr = False, INDIRECT: tl.constexpr = False):
    """The whole one-token step in one launch (``LaunchConfig.one_launch``): each program takes a
    ticket from ``step_ptr[0]`` and runs that work item: first ``PACK_ITEMS`` items packing the
    input ``xin`` into ``x`` (the packed formats' activation vector), then gate_up's items
    (expert-major), each waiting (acquire) until ``step_ptr[2]`` counts every packing item done,
    then down's items (expert-major), each waiting until ``step_ptr[3 + e]`` counts all of expert
    e's gate_up row blocks written. Tickets, not program ids, make the waits safe: a smaller ticket
    belongs to a program already running that waits only on smaller tickets, so it finishes
    whatever order the blocks are scheduled in and however few fit at once. The last program to
    finish (``step_ptr[1]``) resets the counters for the next step. Under Triton's interpreter
    programs run one after another in ticket order, so no wait ever spins."""
    ticket = tl.atomic_add(step_ptr, 1, sem="relaxed")
    gate_up_items = E * (G_BLOCKS * G_SPLIT)
    if ticket < PACK_ITEMS:
        _pack_item(ticket, xin_ptr, x_ptr, H, C_IN, BITS, PACK_BLOCK)
        tl.debug_barrier()  # every thread's stores happen before the release below
        tl.atomic_add(step_ptr + 2, 1, sem="release")
    elif ticket < PACK_ITEMS + gate_up_items:
        item = ticket - PACK_ITEMS
        e = item // (G_BLOCKS * G_SPLIT)
        block = item % (G_BLOCKS * G_SPLIT) // G_SPLIT
        _gate_up_item(e, block, item % G_SPLIT, G_BLOCKS, w_ptr, s_ptr, offsets_ptr, ids_ptr, combine_ptr, x_ptr, h_ptr,
                      gu_ptr, gu_counters_ptr, step_ptr + 3, E, H, I, W_BYTES, GATE_W, GATE_S, GATE_M, UP_W, UP_S,
                      UP_M, G_ROW, G_KP, G_GROUPS, BITS, G_CPW, G_BLOCK_N, G_SUB_K, G_SUBS, G_SPLIT, G_K_SLICE, KP_DOWN,
                      PACKED, BLOCK_STEPS, ASM, False, C_IN, C_H, GU_BIAS, ACT, LIMIT, ALPHA, True, PRELOAD,
                      PACK_ITEMS > 0, step_ptr + 2, PACK_ITEMS, INDIRECT=INDIRECT)  # waits until the input is packed
    else:
        item = ticket - PACK_ITEMS - gate_up_items
        e = item // (D_BLOCKS * D_SPLIT)
        _down_item(e, item % (D_BLOCKS * D_SPLIT) // D_SPLIT, item % D_SPLIT, w_ptr, s_ptr, offsets_ptr, ids_ptr,
                   combine_ptr, h_ptr, partial_ptr, out_ptr, counters_ptr, E, H, I, W_BYTES, DOWN_W, DOWN_S, DOWN_M,
                   D_ROW, D_KP, D_GROUPS, BITS, D_CPW, D_BLOCK_N, D_SUB_K, D_SUBS, D_SPLIT, D_K_SLICE, PACKED,
                   BLOCK_STEPS, ASM, False, C_H, D_BIAS, PRELOAD, True, step_ptr + 3 + e, G_BLOCKS,
                   INDIRECT=INDIRECT)  # waits for e's h
    tl.debug_barrier()
    if tl.atomic_add(step_ptr + 1, 1, sem="acq_rel") == PACK_ITEMS + gate_up_items + E * (D_BLOCKS * D_SPLIT) - 1:
        # every other program has finished with the counters: plain stores (an atomic exchange each
        # waited for its L2 round trip in turn, at the end of every step)
        for j in range(E + 3):
            tl.store(step_ptr + j, 0)
