"""GPU check of the split-K int4 path in packed float16 arithmetic against the float32 reference.

``python benchmarks/check_int4_packed.py`` (CUDA + Triton): the one-token decode step of the
Qwen3-30B-A3B, Mixtral-8x7B and GPT-OSS-20B expert shapes at int4 g64 and g128, with activations
drawn three ways (standard normal; a few outliers of up to 800 among values of 0.01, like a
model's massive activations; all near 1e-4), each run packed and float32 with NaN-poisoned
scratch. Prints the relative error of each against ``reference_decode``; exits 1 if any is above
1e-2 or not finite. (The packed path prescales each step's activations by a power of two, so the
error should not depend on their magnitude.)
"""

import dataclasses
import sys

import torch

from dymoe.checkpoint.blob import blob_layout
from dymoe.quant.formats import parse_format
from dymoe.quant.kernels import decode_routing, kernel_plan
from dymoe.quant.kernels.reference import random_pool, reference_decode
from dymoe.quant.kernels.triton_experts import DecodeWorkspace, choose_config, launch_decode

SMS = torch.cuda.get_device_properties(0).multi_processor_count

worst = 0.0
for h, i, k in ((2048, 768, 8), (4096, 14336, 2), (2880, 2880, 4)):  # Qwen3-30B-A3B, Mixtral, GPT-OSS-20B
    for group in (64, 128):
        layout = blob_layout(parse_format("int4", group), h, i)
        plan = kernel_plan(layout)
        pool, table = random_pool(layout, k + 2, seed=1, spare_bytes=256)
        pool, table = pool.cuda(), table.cuda()
        g = torch.Generator().manual_seed(2)
        ids = torch.arange(k).view(1, -1).cuda()
        offsets, combine = decode_routing(table, ids, torch.rand(1, k, generator=g).cuda())
        for name, x in (("randn", torch.randn(1, h, generator=g)), ("outliers", torch.randn(1, h, generator=g) * 0.01),
                        ("tiny", torch.randn(1, h, generator=g) * 1e-4)):
            if name == "outliers":
                x[0, :4] = torch.tensor([800.0, -300.0, 120.0, 60.0])
            x = x.bfloat16().cuda()
            ref = reference_decode(pool, offsets, layout, x.float(), combine)
            ws = DecodeWorkspace.allocate(plan, k, 1, "cuda")
            cfgs = (choose_config(plan, "gate_up", k, 1, SMS), choose_config(plan, "down", k, 1, SMS))
            for packed in (True, False):
                c = tuple(dataclasses.replace(cf, packed=packed) for cf in cfgs)
                for b in (ws.hidden, ws.partial, ws.gate_up_partial, ws.hidden_transposed): b.fill_(float("nan"))
                out = launch_decode(pool, offsets, plan, x, combine, ws, *c).float()
                rel = ((out - ref).norm() / ref.norm()).item()
                finite = bool(out.isfinite().all())
                worst = max(worst, rel if finite else float("inf"))
                print(f"H{h} I{i} g{group} {name:8s} packed={packed!s:5} rel {rel:.2e} finite {finite}")
print(f"worst relative error {worst:.2e} (limit 1e-2)")
sys.exit(0 if worst < 1e-2 else 1)
