"""Triton kernel: several experts of one precision dequantized in one launch, read in place from pool slots.

The prefill path of the runtime (docs/kernels.md, "Prefill"): a layer's low-bit experts are
dequantized into a preallocated workspace (gate_up ``[n, 2I, H]``, down ``[n, H, I]``) and then run
through the same grouped bf16 matmuls as bf16 slots. One launch, grid (tiles, experts): a program
dequantizes a ``[BLOCK_R, BLOCK_C]`` tile of the gate, up or down weight of one expert, so every
byte of the blobs is read once and every weight written once.

Values are those of :func:`dymoe.quant.reference.dequantize`, bit for bit: ``code * scale + min``
(``code * scale`` for int8) in float32, rounded once to the workspace dtype. The launch turns
floating-point contraction off (``enable_fp_fusion=False``): the reference rounds the product and the
sum separately, an FMA would round once and differ in the last bit.
"""

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dymoe.quant.kernels.plan import KernelPlan, Projection
from dymoe.quant.kernels.triton_experts import _code_tile, _format_args


@triton.jit
def _to_bf16_bits(w):
    """float32 -> bf16 with round-to-nearest-even, as int16 bits: what ``.to(tl.bfloat16)`` does on
    the GPU. Only under the interpreter, whose float32 -> bf16 cast truncates (Triton 3.8 on numpy)."""
    bits = w.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _dequant_tile(w_ptr, s_ptr, w_base, s_base, m_base, out_ptr, rows, row_ok, col0,
                  COLS: tl.constexpr, ROW: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr,
                  BITS: tl.constexpr, CPW: tl.constexpr, BLOCK_R: tl.constexpr, SUB_C: tl.constexpr,
                  SUBS: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """Rows ``rows`` x columns ``col0 .. col0 + SUBS*SUB_C`` of one weight: ``out[r, k] = W[r, k]``
    (``out`` rows are ``COLS`` apart; stored columns past ``COLS``, a padded last group, are not
    written). A group format's ``SUB_C`` is one group, so each step has one scale and min per row."""
    if BITS == 8:
        row_scale = tl.load(s_ptr + s_base + rows, mask=row_ok, other=0).to(tl.float32)
    for sub in tl.static_range(SUBS):
        k0 = col0 + sub * SUB_C
        w = _code_tile(w_ptr, w_base, rows, row_ok, k0, ROW, KP, BITS, CPW, BLOCK_R, SUB_C).to(tl.float32)
        if BITS == 8:
            w = w * row_scale[:, None]
        elif BITS < 8:
            g = k0 // SUB_C + rows * 0  # as a tensor: the interpreter rejects a scalar mask term
            smask = row_ok & (g < GROUPS)
            s = tl.load(s_ptr + s_base + rows * GROUPS + g, mask=smask, other=0).to(tl.float32)
            m = tl.load(s_ptr + m_base + rows * GROUPS + g, mask=smask, other=0).to(tl.float32)
            w = w * s[:, None] + m[:, None]
        cols = k0 + tl.arange(0, SUB_C)
        mask = row_ok[:, None] & (cols[None, :] < COLS)
        if BF16_BY_HAND:
            value = _to_bf16_bits(w)
        else:
            value = w.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * COLS + cols[None, :], value, mask=mask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, offsets_ptr, gate_up_ptr, down_ptr,
                    H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                    GATE_W: tl.constexpr, GATE_S: tl.constexpr, GATE_M: tl.constexpr,
                    UP_W: tl.constexpr, UP_S: tl.constexpr, UP_M: tl.constexpr,
                    DOWN_W: tl.constexpr, DOWN_S: tl.constexpr, DOWN_M: tl.constexpr,
                    ROW_H: tl.constexpr, KP_H: tl.constexpr, GROUPS_H: tl.constexpr,
                    ROW_I: tl.constexpr, KP_I: tl.constexpr, GROUPS_I: tl.constexpr,
                    BITS: tl.constexpr, CPW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    SUB_C: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """Program (tile, e): one [BLOCK_R, BLOCK_C] tile of expert e's gate, up (gate_up rows I..2I) or
    down weight. Tiles are numbered gate, then up, then down, row-major within each."""
    tile = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)  # e * 2IH overflows int32 at Mixtral's shape
    slot = tl.load(offsets_ptr + e)
    w_slot = tl.multiple_of(slot // W_BYTES, 64)  # slots are 256-byte aligned (SlotPool.ALIGN)
    s_slot = tl.multiple_of(slot // 2, 128)
    SUBS: tl.constexpr = BLOCK_C // SUB_C
    I_ROW_TILES: tl.constexpr = (I + BLOCK_R - 1) // BLOCK_R
    H_COL_TILES: tl.constexpr = (H + BLOCK_C - 1) // BLOCK_C
    I_COL_TILES: tl.constexpr = (I + BLOCK_C - 1) // BLOCK_C
    if tile < 2 * I_ROW_TILES * H_COL_TILES:  # gate or up: [I, H] each
        row_tile = tile // H_COL_TILES
        up = (row_tile >= I_ROW_TILES).to(tl.int32)
        rows = (row_tile - up * I_ROW_TILES) * BLOCK_R + tl.arange(0, BLOCK_R)
        w_base = w_slot + GATE_W + up * (UP_W - GATE_W)
        s_base = s_slot + GATE_S + up * (UP_S - GATE_S)
        m_base = s_slot + GATE_M + up * (UP_M - GATE_M)
        out = gate_up_ptr + e * (2 * I * H) + up * (I * H)
        _dequant_tile(w_ptr, s_ptr, w_base, s_base, m_base, out, rows, rows < I, (tile % H_COL_TILES) * BLOCK_C,
                      H, ROW_H, KP_H, GROUPS_H, BITS, CPW, BLOCK_R, SUB_C, SUBS, BF16_BY_HAND)
    else:  # down: [H, I]
        tile = tile - 2 * I_ROW_TILES * H_COL_TILES
        rows = (tile // I_COL_TILES) * BLOCK_R + tl.arange(0, BLOCK_R)
        _dequant_tile(w_ptr, s_ptr, w_slot + DOWN_W, s_slot + DOWN_S, s_slot + DOWN_M, down_ptr + e * (H * I),
                      rows, rows < H, (tile % I_COL_TILES) * BLOCK_C, I, ROW_I, KP_I, GROUPS_I, BITS, CPW,
                      BLOCK_R, SUB_C, SUBS, BF16_BY_HAND)


# ---- launching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DequantConfig:
    """Tiles of the dequantize launch: ``block_r`` rows x ``block_c`` columns per program (``block_c``
    a multiple of the group size; a group format steps one group at a time, the others 128 columns)."""

    block_r: int = 32
    block_c: int = 512
    num_warps: int = 4


def _tiles(plan: KernelPlan, config: DequantConfig) -> int:
    h, i, r, c = plan.hidden_size, plan.intermediate_size, config.block_r, config.block_c
    return 2 * triton.cdiv(i, r) * triton.cdiv(h, c) + triton.cdiv(h, r) * triton.cdiv(i, c)


def _projection_args(plan: KernelPlan, proj: Projection, suffix: str) -> dict:
    args = _format_args(plan, proj, interpreting=False)
    return {f"ROW_{suffix}": args["ROW"], f"KP_{suffix}": args["KP"], f"GROUPS_{suffix}": args["GROUPS"]}


@functools.lru_cache(maxsize=64)
def _launch_args(plan: KernelPlan, config: DequantConfig, bf16_by_hand: bool) -> dict:
    """Constexpr kwargs of one (plan, config): computed once, so a launch is one dict lookup."""
    g, u, d = plan.gate, plan.up, plan.down
    fmt = _format_args(plan, g, interpreting=False)
    sub_c = plan.group_size or 128
    if config.block_c % sub_c:
        raise ValueError(f"block_c {config.block_c} is not a multiple of the {sub_c}-column step")
    return dict(H=plan.hidden_size, I=plan.intermediate_size, W_BYTES=fmt["W_BYTES"],
                GATE_W=g.weight, GATE_S=g.scales, GATE_M=g.mins, UP_W=u.weight, UP_S=u.scales, UP_M=u.mins,
                DOWN_W=d.weight, DOWN_S=d.scales, DOWN_M=d.mins, **_projection_args(plan, g, "H"),
                **_projection_args(plan, d, "I"), BITS=plan.bits, CPW=fmt["CPW"], BLOCK_R=config.block_r,
                BLOCK_C=config.block_c, SUB_C=sub_c, BF16_BY_HAND=bf16_by_hand, num_warps=config.num_warps)


def launch_dequantize(pool: torch.Tensor, slot_offsets: torch.Tensor, plan: KernelPlan, gate_up: torch.Tensor,
                      down: torch.Tensor, config: DequantConfig | None = None) -> None:
    """The Triton path of :func:`dymoe.quant.kernels.dequantize_experts` (same arguments): one launch
    for all ``slot_offsets.numel()`` experts."""
    n = slot_offsets.numel()
    if n == 0:
        return
    config = config or DequantConfig()
    bf16_by_hand = os.environ.get("TRITON_INTERPRET") == "1" and gate_up.dtype == torch.bfloat16
    kwargs = _launch_args(plan, config, bf16_by_hand)
    if bf16_by_hand:
        gate_up, down = gate_up.view(torch.int16), down.view(torch.int16)
    _dequant_kernel[(_tiles(plan, config), n)](pool.view(plan.payload_dtype), pool.view(torch.float16),
                                                slot_offsets, gate_up, down, enable_fp_fusion=False, **kwargs)
