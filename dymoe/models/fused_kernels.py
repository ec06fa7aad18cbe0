"""The Triton kernels of :mod:`dymoe.models.fused` (imported only when they run: Triton is the
``gpu`` extra)."""

import triton
import triton.language as tl


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
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr):
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
                  D: tl.constexpr, BLOCK: tl.constexpr, FROM_DEVICE: tl.constexpr):
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
