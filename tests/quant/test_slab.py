"""The slab step (dymoe/quant/kernels/slab.py) under Triton's interpreter: the one-token step of
the packed formats as one launch of independent programs equals dequantize-then-matmul, equals the
split-K step's result, gives the same bits twice (its fixed-point sum does not depend on the order
the programs land in) and leaves its accumulator and counter at zero."""

from __future__ import annotations

from tests.interpreted import needs_gpu, needs_triton, run_interpreted

CASES = [("int4", 64, 32), ("int4", 128, 64), ("int2", 128, 64), ("int3", 64, 64)]  # format, group, slab

_SCRIPT = r"""
import json, torch, triton
from dymoe.checkpoint.blob import blob_layout
from dymoe.models.expert_math import ExpertMath
from dymoe.quant.formats import parse_format
from dymoe.quant.kernels import decode_routing, kernel_plan, reference_decode
from dymoe.quant.kernels.reference import random_pool
from dymoe.quant.kernels.slab import SlabConfig, launch_slab
from dymoe.quant.kernels.split_k import _pack_input_kernel
from dymoe.quant.kernels.triton_experts import PACK_BLOCK, DecodeWorkspace, chunk_values, launch_decode, packed_words

H, I = SHAPE  # 160: a padded last group of the input at 64 and 128
GPT_OSS = ExpertMath("gpt_oss", bias=True)
results = {}
for precision, group, slab in CASES:
    for biased in (False, True):
        if biased and (precision, group) != CASES[0][:2]:
            continue
        layout = blob_layout(parse_format(precision, group), H, I, bias=biased)
        plan = kernel_plan(layout)
        math = GPT_OSS if biased else ExpertMath()
        pool, table = random_pool(layout, 5, seed=3, device=DEVICE)
        g = torch.Generator().manual_seed(4)
        # expert 3 twice (deduplicated: one column with the summed weight, one zero column) and 0
        offsets, combine = decode_routing(table, torch.tensor([[3, 0, 3]], device=DEVICE),
                                          torch.softmax(torch.randn(1, 3, generator=g), -1).to(DEVICE))
        x = torch.randn(1, H, generator=g).to(DEVICE, torch.bfloat16)
        ref = reference_decode(pool, offsets, layout, x.float(), combine, math=math)
        packed = torch.empty(packed_words(H, plan.bits), dtype=torch.int32, device=DEVICE)
        _pack_input_kernel[(triton.cdiv(H, PACK_BLOCK),)](x, packed, H=H, C=triton.cdiv(H, chunk_values(plan.bits)),
                                                          BITS=plan.bits, BLOCK=PACK_BLOCK, num_warps=4)
        ws = DecodeWorkspace.allocate(plan, offsets.numel(), 1, DEVICE)
        ws.hidden_transposed.view(torch.int32).fill_(-1)  # NaN pairs wherever a program would read h it did not write
        config = SlabConfig(slab=slab, g_step=max(G_STEP, group), d_block=D_BLOCK)
        first = launch_slab(pool, offsets, plan, x, combine, ws, config, math, x_packed=packed)
        reset = ws.counters_at_zero()
        again = launch_slab(pool, offsets, plan, x, combine, ws, config, math)  # packing its own input
        if biased:  # (once: an offset table indexed by slot ids)
            table_out = launch_slab(pool, table, plan, x, combine, ws, config, math, slot_ids=offsets // layout.nbytes,
                                    x_packed=packed)
        else:
            table_out = first
        split = launch_decode(pool, offsets, plan, x, combine, DecodeWorkspace.allocate(plan, 3, 1, DEVICE), math=math)
        results[f"{precision}/{group}" + ("/gpt_oss" if biased else "")] = dict(
            rel=((first.float() - ref).norm() / ref.norm()).item(), finite=bool(first.isfinite().all()),
            vs_split=((first.float() - split.float()).norm() / ref.norm()).item(), reset=reset,
            same=bool(torch.equal(first, again)), indirect=bool(torch.equal(first, table_out)))
print(json.dumps(results))
"""


def _check(results: dict, split_tolerance: float) -> None:
    assert set(results) == {f"{p}/{g}" for p, g, _ in CASES} | {"int4/64/gpt_oss"}
    for name, r in results.items():
        assert r["finite"] and r["rel"] < 1e-2, (name, r)
        # the same float16 chunk sums; only the order of the float32 (split-K) or fixed-point (slab)
        # sum differs, which may flip an output's last bf16 bit (on the GPU; under the interpreter none flips)
        assert r["vs_split"] < split_tolerance, (name, r)
        assert r["reset"] and r["same"] and r["indirect"], (name, r)


@needs_triton
def test_slab_step_equals_the_reference_and_the_split_step():
    _check(run_interpreted(f"CASES = {CASES!r}\nSHAPE = (160, 128)\nG_STEP, D_BLOCK = 128, 128\nDEVICE = 'cpu'\n"
                           + _SCRIPT, fp_fusion=True), 1e-6)


@needs_gpu
def test_slab_step_compiled():
    """The same on a GPU, compiled, at Qwen3-30B-A3B's expert shape (2048 x 768)."""
    _check(run_interpreted(f"CASES = {CASES!r}\nSHAPE = (2048, 768)\nG_STEP, D_BLOCK = 512, 512\nDEVICE = 'cuda'\n"
                           + _SCRIPT, interpret=False), 2e-3)


@needs_triton
def test_slab_configs_that_cannot_run_are_refused():
    from dymoe.checkpoint.blob import blob_layout
    from dymoe.quant.formats import parse_format
    from dymoe.quant.kernels import kernel_plan
    from dymoe.quant.kernels.slab import SlabConfig, slab_fits

    int4 = kernel_plan(blob_layout(parse_format("int4", 128), 256, 256))
    int2 = kernel_plan(blob_layout(parse_format("int2", 64), 256, 256))
    int8 = kernel_plan(blob_layout(parse_format("int8", 128), 256, 256))
    assert slab_fits(int4, SlabConfig(32, 512)) and slab_fits(int4, SlabConfig(256, 512))
    assert not slab_fits(int4, SlabConfig(16, 512))  # under one chunk of h
    assert not slab_fits(int4, SlabConfig(96, 512))  # neither within one group nor whole groups
    assert not slab_fits(int4, SlabConfig(32, 64))  # a gate/up step of half a group
    assert not slab_fits(int2, SlabConfig(32, 512)) and slab_fits(int2, SlabConfig(64, 512))  # int2 chunks: 64
    assert not slab_fits(int8, SlabConfig(32, 512))  # no packed path
