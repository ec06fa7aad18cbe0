"""GPU checks of the fused decode kernels where the CPU tests cannot reach (Triton's interpreter runs
no inline assembly and is too slow for real shapes).

``python benchmarks/check_decode_kernels.py`` (CUDA + Triton), every run with NaN-poisoned scratch
against the float32 ``reference_decode``:

1. the split-K int4, int3 and int2 paths on packed activation vectors (float16 arithmetic) and in
   float32, on the Qwen3-30B-A3B, Mixtral-8x7B and GPT-OSS-20B expert shapes at g64 and g128,
   with activations drawn three ways (standard normal; a few outliers of up to 800 among values
   of 0.01, like a model's massive activations; all near 1e-4): the packed path prescales each
   chunk of 32 (int3, int2: 64) activations by a power of two, so its error should not depend on
   their magnitude;
2. programmatic dependent launch (``LaunchConfig.pdl``; Hopper and newer): four
   one-token steps back to back on one workspace, each with a new input, int8/int4/int3/int2 at
   g128 on the Qwen3 and Mixtral shapes: each launch of a step overlaps the end of the one before,
   so a read before its wait, or a scratch reused too early, shows as a wrong step;
3. GPT-OSS-20B's experts (biases read from the blob, the clamped activation) in every format, one
   token (split-K, packed for int4/int3/int2; tiled for bf16) and three tokens (tensor cores);
4. the one-launch step (``LaunchConfig.one_launch``: input packing, gate_up and down as work items
   of one launch, each waiting for what it reads), 4 steps back to back, bf16 to int2 at g128,
   both shapes;
5. each program's first step of weights loaded before it waits (``LaunchConfig.preload``), with
   programmatic dependent launch and in one launch, 4 steps back to back, int8 to int2 at g128,
   both shapes: a weight load moved past the wait is harmless, an activation load moved before it
   shows as a wrong step.

Prints the relative error of each; exits 1 if any is above 1e-2 or not finite. ``--quick``: only
the packed path with outlier activations on the Qwen3 and Mixtral shapes (12 checks), 2. with
the packed path only (8 checks), 4. (10 checks) and 5. (16 checks).
"""

import argparse
import dataclasses
import sys

import torch

from dymoe.checkpoint.blob import blob_layout
from dymoe.models.expert_math import SWIGLU, ExpertMath
from dymoe.quant.formats import parse_format
from dymoe.quant.kernels import decode_routing, kernel_plan
from dymoe.quant.kernels.reference import random_pool, reference_decode
from dymoe.quant.kernels.triton_experts import (PACKED_BITS, DecodeWorkspace, choose_config, launch_decode,
                                                pdl_supported, split_config)

parser = argparse.ArgumentParser(description="GPU checks of the fused decode kernels against reference_decode")
parser.add_argument("--quick", action="store_true",
                    help="the packed path only, outlier activations, Qwen3-30B-A3B and Mixtral shapes (12 checks), "
                         "and the back-to-back pdl steps (8 checks)")
QUICK = parser.parse_args().quick
SMS = torch.cuda.get_device_properties(0).multi_processor_count
GPT_OSS = ExpertMath("gpt_oss", bias=True, limit=7.0, alpha=1.702)
worst = 0.0


def case(h: int, i: int, k: int, precision: str, group: int, math=SWIGLU, tokens: int = 1):
    layout = blob_layout(parse_format(precision, group), h, i, bias=math.bias)
    pool, table = random_pool(layout, k + 2, seed=1, spare_bytes=256)
    for e in range(k + 2) if math.bias else ():  # biases large enough that leaving one out shows
        for name in ("gate_up.bias", "down.bias"):
            part = layout.part(name)
            start = e * (layout.nbytes + 256) + part.offset
            pool[start:start + part.nbytes].view(torch.bfloat16).mul_(10)
    g = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(k + 2, generator=g)[:k] for _ in range(tokens)])
    offsets, combine = decode_routing(table.cuda(), ids.cuda(), torch.rand(tokens, k, generator=g).cuda())
    return layout, pool.cuda(), offsets, combine, g


def check(label: str, layout, pool, offsets, combine, x, math=SWIGLU, packed: bool = True, pdl: bool = False,
          one_launch: bool = False, preload: bool = False) -> None:
    """One step (``x`` [T, H]), or with ``x`` [S, 1, H] S one-token steps back to back on one
    workspace with no sync between (as a model's layers run them: with ``pdl`` each launch starts
    while the one before finishes, so a missing wait shows as a wrong step; with ``one_launch``
    the whole step is one launch, so an item that reads too early, or a counter left set for the
    next step, shows the same way), against the reference."""
    global worst
    plan = kernel_plan(layout)
    steps = x if x.dim() == 3 else x[None]
    e, t = combine.shape[1], steps.shape[1]
    ws = DecodeWorkspace.allocate(plan, e, t, "cuda")
    if t == 1 and (plan.bits in PACKED_BITS or pdl or one_launch or preload):  # split-K (int3's default may be tiled)
        configs = tuple(dataclasses.replace(split_config(plan, kernel, e, SMS), packed=packed and plan.bits in PACKED_BITS,
                                            pdl=pdl, one_launch=one_launch, preload=preload)
                        for kernel in ("gate_up", "down"))
    else:
        configs = tuple(choose_config(plan, kernel, e, t, SMS) for kernel in ("gate_up", "down"))
    for scratch in ws.scratch():
        scratch.fill_(float("nan"))
    outs = [launch_decode(pool, offsets, plan, step, combine, ws, *configs, math=math) for step in steps]
    rel, finite = 0.0, True
    for step, out in zip(steps, outs):
        ref = reference_decode(pool, offsets, layout, step.float(), combine, math)
        rel = max(rel, ((out.float() - ref).norm() / ref.norm()).item())
        finite = finite and bool(out.isfinite().all())
    worst = max(worst, rel if finite else float("inf"))
    print(f"{label:52s} rel {rel:.2e} finite {finite}" + (f" (worst of {len(steps)} steps)" if len(steps) > 1 else ""),
          flush=True)


for precision in ("int4", "int3", "int2"):
    # Qwen3-30B-A3B, Mixtral-8x7B, GPT-OSS-20B
    for h, i, k in ((2048, 768, 8), (4096, 14336, 2), (2880, 2880, 4))[:2 if QUICK else 3]:
        for group in (64, 128):
            layout, pool, offsets, combine, g = case(h, i, k, precision, group)
            for name in ("outliers",) if QUICK else ("randn", "outliers", "tiny"):
                x = torch.randn(1, h, generator=g) * {"randn": 1.0, "outliers": 0.01, "tiny": 1e-4}[name]
                if name == "outliers":
                    x[0, :4] = torch.tensor([800.0, -300.0, 120.0, 60.0])
                for packed in (True,) if QUICK else (True, False):
                    check(f"{precision} H{h} I{i} g{group} {name} packed={packed}", layout, pool, offsets, combine,
                          x.bfloat16().cuda(), packed=packed)

if pdl_supported(torch.device("cuda")):  # programmatic dependent launch: 4 steps back to back, new input each
    for precision in ("int8", "int4", "int3", "int2"):
        for h, i, k in ((2048, 768, 8), (4096, 14336, 2)):
            layout, pool, offsets, combine, g = case(h, i, k, precision, 128)
            for packed in (True,) if QUICK or precision == "int8" else (True, False):
                x = (torch.randn(4, 1, h, generator=g) * 0.1).bfloat16().cuda()
                check(f"{precision} H{h} I{i} g128 pdl packed={packed}", layout, pool, offsets, combine, x,
                      packed=packed, pdl=True)
else:
    print("no programmatic dependent launch on this GPU/Triton: pdl not checked")

for precision, group in () if QUICK else (("bf16", 128), ("int8", 128), ("int4", 64), ("int4", 128), ("int3", 128),
                                          ("int2", 64)):
    for tokens in (1, 3):
        layout, pool, offsets, combine, g = case(2880, 2880, 4, precision, group, GPT_OSS, tokens)
        x = torch.randn(tokens, 2880, generator=g).bfloat16().cuda()
        check(f"gpt-oss {precision}/g{group} tokens {tokens}", layout, pool, offsets, combine, x, GPT_OSS)

# the whole step in one launch (LaunchConfig.one_launch): 4 steps back to back, new input each.
# Last, since it is the newest: a kernel that waited forever here leaves every other line printed
for precision in ("bf16", "int8", "int4", "int3", "int2"):
    for h, i, k in ((2048, 768, 8), (4096, 14336, 2)):
        layout, pool, offsets, combine, g = case(h, i, k, precision, 128)
        x = (torch.randn(4, 1, h, generator=g) * 0.1).bfloat16().cuda()
        check(f"{precision} H{h} I{i} g128 one launch", layout, pool, offsets, combine, x, one_launch=True)

# each program's first step of weights loaded before its wait (LaunchConfig.preload), both launch forms
for precision in ("int8", "int4", "int3", "int2"):
    for h, i, k in ((2048, 768, 8), (4096, 14336, 2)):
        layout, pool, offsets, combine, g = case(h, i, k, precision, 128)
        x = (torch.randn(4, 1, h, generator=g) * 0.1).bfloat16().cuda()
        for one_launch in (False, True):
            check(f"{precision} H{h} I{i} g128 preload{' one launch' if one_launch else ' pdl'}", layout, pool,
                  offsets, combine, x, pdl=pdl_supported(torch.device("cuda")), one_launch=one_launch, preload=True)

print(f"worst relative error {worst:.2e} (limit 1e-2)")
sys.exit(0 if worst < 1e-2 else 1)
