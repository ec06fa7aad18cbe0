"""Triton kernel: the one-token decode step of the packed formats in one launch of independent
programs, each owning a slab of the intermediate dimension.

The split-K step (:mod:`dymoe.quant.kernels.split_k`) is a chain: gate_up's K slices, their
reduction into ``h``, then down, whose partials are reduced again. On a short step (Qwen3-30B-A3B's
int4 experts are ~20 MB, ~7 us at copy speed) the chain's waits cost as much as the reading.
Here program (e, b) takes rows ``b * SLAB ..`` of expert e's gate and up over all of K, so it
holds whole values of ``h`` for those rows with nobody to wait for; it packs them
(:func:`~dymoe.quant.kernels.split_k._pack_chunks`), then multiplies them with the same ``SLAB``
columns of down for all H output rows. What it produces is one term of the step's sum over
(expert, slab), which it adds into a fixed-point accumulator: 64-bit integers holding
``value * 2**FRACTION_BITS``, truncated toward zero. Integer addition is associative, so the sum
does not depend on the order the programs land in (the result is deterministic, as the
split-K step's fixed-order sums are), and it needs no scratch of partials and no reduction pass.
The last program to finish (an acq_rel counter) turns the accumulator into the output and zeroes
it and the counter for the next step.

Rounding: each term loses under ``2**-FRACTION_BITS`` (2.3e-10) in absolute value, a few hundred
terms at most per output, far under float32's rounding of any output that bf16 can tell from zero.
The range: a sum of terms must stay under ``2**(63 - FRACTION_BITS)`` (2.1e9) in magnitude.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dymoe.env import env_override
from dymoe.models.expert_math import SWIGLU, ExpertMath
from dymoe.quant.kernels import interpreting
from dymoe.quant.kernels.plan import KernelPlan
from dymoe.quant.kernels.split_k import (_pack_input_kernel, _packed_step, _packed_words, _store_hidden,
                                          gdc_launch_dependents, gdc_wait)
from dymoe.quant.kernels.triton_experts import (ACTIVATION_CODES, PACK_BLOCK, PACK_WARPS, PACKED_BITS,
                                                 DecodeWorkspace, _bias, _early, _expert_slot, _glu, _live,
                                                 chunk_values, packed_words, pdl_supported, step_runs_packed)

FRACTION_BITS = 32


@triton.jit
def _slab_kernel(w_ptr, s_ptr, offsets_ptr, ids_ptr, combine_ptr, x_ptr, h_ptr, acc_ptr, out_ptr, counter_ptr, E,
                 H: tl.constexpr, I: tl.constexpr, W_BYTES: tl.constexpr,
                 GATE_W: tl.constexpr, GATE_S: tl.constexpr, GATE_M: tl.constexpr,
                 UP_W: tl.constexpr, UP_S: tl.constexpr, UP_M: tl.constexpr,
                 DOWN_W: tl.constexpr, DOWN_S: tl.constexpr, DOWN_M: tl.constexpr,
                 G_ROW: tl.constexpr, G_KP: tl.constexpr, G_GROUPS: tl.constexpr,
                 D_ROW: tl.constexpr, D_KP: tl.constexpr, D_GROUPS: tl.constexpr, BITS: tl.constexpr,
                 GROUP: tl.constexpr, SLAB: tl.constexpr, G_STEP: tl.constexpr, D_BLOCK: tl.constexpr,
                 C_IN: tl.constexpr, C_H: tl.constexpr, FRACTION: tl.constexpr, DOWN_FIRST: tl.constexpr = False,
                 ROTATE: tl.constexpr = True,
                 ASM: tl.constexpr = True,
                 PDL: tl.constexpr = False, GU_BIAS: tl.constexpr = -1, ACT: tl.constexpr = 0,
                 LIMIT: tl.constexpr = 7.0, ALPHA: tl.constexpr = 1.702, D_BIAS: tl.constexpr = -1,
                 INDIRECT: tl.constexpr = False):
    """Grid (experts, I / SLAB). ``x_ptr``: the input as a packed activation vector of ``C_IN``
    chunks; ``h_ptr``: per expert a packed vector of ``C_H`` chunks (each program writes and reads
    only its own); ``acc_ptr`` [H] int64 and ``counter_ptr`` zero between steps. ``PDL``: started
    before the launch before it ends, it waits for that one before reading anything.
    ``DOWN_FIRST``: the first down block's weights are loaded before gate's and up's loop;
    ``ROTATE``: each program walks down's row blocks from another one."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    e = tl.program_id(0)
    block = tl.program_id(1)
    V: tl.constexpr = 64 if BITS == 3 else 128 // BITS  # values per chunk
    rows = block * SLAB + tl.arange(0, SLAB)
    w_slot, s_slot, t, c, active = _expert_slot(offsets_ptr, ids_ptr, combine_ptr, e, 1, E, W_BYTES, 2, INDIRECT)
    row_ok = _live(rows, rows < I, active)  # an unused expert's slot may hold anything: read none of it
    NB: tl.constexpr = (H + D_BLOCK - 1) // D_BLOCK  # down row blocks
    # ROTATE: program p starts down at row block p % NB, so that the programs' additions to the
    # accumulator are spread over its rows rather than all on the same rows at once
    shift = ((e * tl.num_programs(1) + block) % NB) * D_BLOCK if ROTATE else 0
    if DOWN_FIRST:  # the first block of down's weights in flight with gate's and up's
        out_rows = shift + tl.arange(0, D_BLOCK)
        down_first = _packed_words(w_ptr, w_slot + DOWN_W, w_slot + DOWN_W, out_rows,
                                   _live(out_rows, out_rows < H, active), block * SLAB, D_ROW, D_KP, BITS, D_BLOCK,
                                   SLAB, False)
    acc_g = tl.zeros((SLAB, G_STEP // V), dtype=tl.float32)
    acc_u = acc_g
    for k0 in tl.static_range(0, G_KP, G_STEP):
        acc_g, acc_u = _packed_step(acc_g, acc_u, w_ptr, s_ptr, w_slot + GATE_W, s_slot + GATE_S, s_slot + GATE_M,
                                    w_slot + UP_W, s_slot + UP_S, s_slot + UP_M, rows, row_ok, k0, x_ptr, C_IN, G_ROW,
                                    G_KP, G_GROUPS, BITS, SLAB, G_STEP, GROUP, ASM, True)
    gate = tl.sum(acc_g, axis=1) + _bias(s_ptr, s_slot, GU_BIAS, rows, row_ok)
    up = tl.sum(acc_u, axis=1) + _bias(s_ptr, s_slot, GU_BIAS, rows + I, row_ok)  # up's biases follow gate's
    weight = tl.sum(c, axis=0)  # one token: the routing column's only entry
    h = tl.where(row_ok, _glu(gate, up, ACT, LIMIT, ALPHA) * weight, 0.0)
    _store_hidden(h_ptr, e, block, rows, row_ok, h, D_KP, 0, BITS, SLAB, True, C_H)
    tl.debug_barrier()  # the program's h, packed, before any thread reads it back
    h_at = h_ptr + e * ((V // 2 + 2) * C_H)
    first = (block == 0).to(tl.float32)
    for r0 in tl.static_range(0, H, D_BLOCK):
        out_rows = (r0 + shift) % (NB * D_BLOCK) + tl.arange(0, D_BLOCK)
        out_ok = _live(out_rows, out_rows < H, active)
        acc = tl.zeros((D_BLOCK, SLAB // V), dtype=tl.float32)
        if DOWN_FIRST and r0 == 0:
            acc, _ = _packed_step(acc, acc, w_ptr, s_ptr, w_slot + DOWN_W, s_slot + DOWN_S, s_slot + DOWN_M,
                                  w_slot + DOWN_W, s_slot + DOWN_S, s_slot + DOWN_M, out_rows, out_ok, block * SLAB,
                                  h_at, C_H, D_ROW, D_KP, D_GROUPS, BITS, D_BLOCK, SLAB, GROUP, ASM, False, down_first)
        else:
            acc, _ = _packed_step(acc, acc, w_ptr, s_ptr, w_slot + DOWN_W, s_slot + DOWN_S, s_slot + DOWN_M,
                                  w_slot + DOWN_W, s_slot + DOWN_S, s_slot + DOWN_M, out_rows, out_ok, block * SLAB,
                                  h_at, C_H, D_ROW, D_KP, D_GROUPS, BITS, D_BLOCK, SLAB, GROUP, ASM, False)
        y = tl.sum(acc, axis=1)
        if D_BIAS >= 0:  # the router weight times the expert's bias, once (in the first slab's term)
            y += _bias(s_ptr, s_slot, D_BIAS, out_rows, out_ok) * (weight * first)
        tl.atomic_add(acc_ptr + out_rows, (y * FRACTION).to(tl.int64), mask=out_ok, sem="relaxed")
    tl.debug_barrier()  # every thread's additions happen before the release below
    if tl.atomic_add(counter_ptr, 1, sem="acq_rel") == E * tl.num_programs(1) - 1:
        for r0 in tl.static_range(0, H, D_BLOCK):
            out_rows = r0 + tl.arange(0, D_BLOCK)
            total = tl.load(acc_ptr + out_rows, mask=out_rows < H, other=0, cache_modifier=".cg")
            tl.store(out_ptr + out_rows, (total.to(tl.float32) / FRACTION).to(out_ptr.dtype.element_ty),
                     mask=out_rows < H)
            tl.store(acc_ptr + out_rows, tl.zeros_like(total), mask=out_rows < H)
        tl.store(counter_ptr, 0)  # every program has counted: a plain store


# ---- launching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlabConfig:
    """Tiles of the slab step: ``slab`` intermediate rows per program (whole chunks of ``h``),
    ``g_step`` input columns per gate/up step (whole groups), ``d_block`` down rows per step."""

    slab: int = 32
    g_step: int = 512
    d_block: int = 512
    num_warps: int = 4
    max_registers: int | None = None
    down_first: bool = False  # the first down block's weights loaded before gate's and up's loop
    rotate: bool = True  # each program starts down at another row block


def slab_fits(plan: KernelPlan, config: SlabConfig) -> bool:
    """Whether the slab step can run ``plan`` with ``config``: a packed format whose groups hold
    whole chunks, a slab of whole chunks within one group or of whole groups, whole groups per
    gate/up step."""
    if plan.bits not in PACKED_BITS or not plan.group_size or plan.group_size % chunk_values(plan.bits):
        return False
    slab, group = config.slab, plan.group_size
    return (slab % chunk_values(plan.bits) == 0 and (group % slab == 0 or slab % group == 0)
            and config.g_step % group == 0)


@functools.lru_cache(maxsize=64)
def _slab_launch(plan: KernelPlan, experts: int, config: SlabConfig, interpreting: bool, math: ExpertMath,
                 pdl: bool) -> tuple[tuple, dict]:
    if not slab_fits(plan, config):
        raise ValueError(f"the slab step cannot run int{plan.bits}/g{plan.group_size} with {config}")
    g, u, d = plan.gate, plan.up, plan.down
    div = 4 if plan.bits == 3 else 1  # packed int3 reads its rows as 32-bit words, not bytes
    w_bytes = 4 if plan.bits == 3 else plan.payload_elem_bytes
    kwargs = dict(H=plan.hidden_size, I=plan.intermediate_size, W_BYTES=w_bytes,
                  GATE_W=g.weight // div, GATE_S=g.scales, GATE_M=g.mins, UP_W=u.weight // div, UP_S=u.scales,
                  UP_M=u.mins, DOWN_W=d.weight // div, DOWN_S=d.scales, DOWN_M=d.mins,
                  G_ROW=g.row_elems // div, G_KP=g.padded_cols, G_GROUPS=g.padded_cols // plan.group_size,
                  D_ROW=d.row_elems // div, D_KP=d.padded_cols, D_GROUPS=d.padded_cols // plan.group_size,
                  BITS=plan.bits, GROUP=plan.group_size, SLAB=config.slab, G_STEP=config.g_step,
                  D_BLOCK=config.d_block, C_IN=triton.cdiv(plan.hidden_size, chunk_values(plan.bits)),
                  C_H=triton.cdiv(plan.intermediate_size, chunk_values(plan.bits)), FRACTION=float(2**FRACTION_BITS),
                  DOWN_FIRST=config.down_first, ROTATE=config.rotate,
                  ASM=not interpreting, PDL=pdl, GU_BIAS=plan.gate_up_bias, ACT=ACTIVATION_CODES[math.activation],
                  LIMIT=float(math.limit), ALPHA=float(math.alpha), D_BIAS=plan.down_bias,
                  num_warps=config.num_warps)
    if pdl:
        kwargs["launch_pdl"] = True
    if config.max_registers and not interpreting:
        kwargs["maxnreg"] = config.max_registers
    return (experts, triton.cdiv(plan.intermediate_size, config.slab)), kwargs


def _slab_override() -> bool | None:
    """DYMOE_SLAB_STEP from the environment: 1 runs every one-token int4, int3 and int2 step that
    fits as one slab launch, 0 none, unset leaves it to :func:`slab_by_default`."""
    return env_override("DYMOE_SLAB_STEP", "one-token int4/int3/int2 steps as one slab launch",
                        "off; unset: where it measured faster")


SLAB_OVERRIDE = _slab_override()


def slab_by_default(plan: KernelPlan) -> bool:
    """Whether a one-token step of ``plan`` runs as a slab launch unless DYMOE_SLAB_STEP says
    otherwise. Not yet measured on a GPU: nowhere."""
    return False


def default_config(plan: KernelPlan) -> SlabConfig:
    """The slab config of a step of ``plan``: slabs of one chunk (32 int4 rows, 64 int3 or int2),
    gate/up steps of 512 columns (at least a group), down blocks of 512 rows, 4 warps."""
    return SlabConfig(slab=chunk_values(plan.bits), g_step=max(512, plan.group_size), d_block=512)


@functools.lru_cache(maxsize=64)
def slab_step(plan: KernelPlan, experts: int, device: torch.device) -> SlabConfig | None:
    """The config of the slab launch that runs a one-token step of ``plan`` through ``experts``
    experts on ``device``, or None where the split-K step runs: a packed format whose split-K step
    runs packed (so the router's packing serves both) and :data:`SLAB_OVERRIDE` or
    :func:`slab_by_default`."""
    if not (SLAB_OVERRIDE if SLAB_OVERRIDE is not None else slab_by_default(plan)):
        return None
    config = default_config(plan)
    if not (slab_fits(plan, config) and step_runs_packed(plan, experts, device)):
        return None
    return config


def launch_slab(pool: torch.Tensor, slot_offsets: torch.Tensor, plan: KernelPlan, x: torch.Tensor,
                combine: torch.Tensor, workspace: DecodeWorkspace, config: SlabConfig, math: ExpertMath = SWIGLU,
                slot_ids: torch.Tensor | None = None, x_packed: torch.Tensor | None = None) -> torch.Tensor:
    """One token's step through the experts of ``slot_offsets`` as
    :func:`~dymoe.quant.kernels.triton_experts.launch_decode` computes it (same arguments), as
    one slab launch; ``x_packed``: ``x`` already as the step's packed activation vector
    (:class:`~dymoe.quant.kernels.InputPacking`), else a launch packs it first."""
    t, e = combine.shape
    if t != 1:
        raise ValueError(f"the slab step takes one token, got {t}")
    pdl = pdl_supported(pool.device)
    grid, kwargs = _slab_launch(plan, e, config, interpreting(), math, pdl)
    hidden = workspace.hidden_transposed.view(torch.int32)
    if e * packed_words(plan.intermediate_size, plan.bits) > hidden.numel():
        raise ValueError(f"workspace too small for {e} experts")
    if x_packed is None:
        x_packed = workspace.input_packed
        h = plan.hidden_size
        _pack_input_kernel[(triton.cdiv(h, PACK_BLOCK),)](x, x_packed, H=h, C=kwargs["C_IN"], BITS=plan.bits,
                                                          BLOCK=PACK_BLOCK, PDL=pdl, num_warps=PACK_WARPS,
                                                          **_early(pdl))
    elif x_packed.numel() < packed_words(plan.hidden_size, plan.bits):
        raise ValueError(f"a packed input of {x_packed.numel()} words, int{plan.bits} of "
                         f"{plan.hidden_size} values takes {packed_words(plan.hidden_size, plan.bits)}")
    indirect = slot_ids is not None
    out = torch.empty_like(x)
    _slab_kernel[grid](pool.view(torch.int32), pool.view(torch.float16), slot_offsets,
                       slot_ids if indirect else slot_offsets, combine, x_packed, hidden, workspace.slab_total, out,
                       workspace.slab_counter, e, **kwargs, INDIRECT=indirect)
    return out
