"""GPU check of the fused dense kernels (dymoe/models/fused.py) against the torch code, in bf16:
RMSNorm rows of the block norms (Qwen3 2048, Mixtral 4096, DeepSeek-V3 7168, a 2880 tail) and
of the per-head q/k norms (128), at 1 and 512 tokens; the residual add with the following norm
(layers.add_norm); the rotary embedding of Qwen3's q and k
at an integer start (prefill) and at a position read from the device (decode), on the strided
[B, heads, T, D] views the attention passes; the router's top-k (fused.route) with Qwen3-30B-A3B's,
Mixtral's, OLMoE's and a scaled sigmoid router's shapes, by their own choice and for given
experts (synthetic routing), at 1 and 512 tokens; a decoded token's weighted sum of its expert
rows (fused.combine) against its definition; the grouped decode's plan (fused.group_plan) against
torch's sort and searchsorted.

    python benchmarks/check_dense_kernels.py

Prints, per case, the largest difference in bf16 units in the last place and the share of equal
outputs; exits 1 if any output is off by more than one unit (RMSNorm and the router weights: only
a float32 sum's order differs; add_norm's sum must be equal), the rotary embedding differs at all (its roundings are the torch
code's) or a router picks other experts or weighs one otherwise (equal weights may come in
another order: bf16 logits often tie, and torch.topk leaves their order open), or the sum of
expert rows differs at all from its definition, or the plan from torch's.
"""

import dataclasses
import sys

import torch

import dymoe.models.fused as fused
from dymoe.models.config import ModelConfig, RopeConfig
from dymoe.models.layers import RMSNorm, RotaryEmbedding, StaticPosition, add_norm
from dymoe.models.moe import Router


def ulps(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference in bf16 units in the last place of the reference value (a value near zero
    counts in the unit of the smallest normal number, so a sign flip of a tiny value stays small)."""
    _, exponent = torch.frexp(ref.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny))
    unit = torch.ldexp(torch.ones_like(ref, dtype=torch.float32), exponent - 8)  # |ref| in [2^(e-1), 2^e)
    return float(((got.float() - ref.float()).abs() / unit).max())


def both(fn):
    fused.ENABLED = False
    ref = fn()
    fused.ENABLED = True
    return ref, fn()


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    for n, shape in ((2048, (1, 1)), (4096, (1, 1)), (7168, (1, 1)), (2880, (1, 1)), (2048, (1, 512)),
                     (128, (1, 1, 32)), (128, (1, 512, 4))):
        norm = RMSNorm(n, 1e-6).cuda().bfloat16()
        norm.weight.data = torch.randn(n, device="cuda").bfloat16()
        x = (torch.randn(*shape, n, device="cuda") * 2).bfloat16()
        ref, got = both(lambda: norm(x))
        off = ulps(got, ref)
        equal = float((got == ref).float().mean())
        failures += off > 1 or got.dtype != ref.dtype
        print(f"rms_norm  n {n:5d} rows {x.numel() // n:6d}: max {off:g} ulp, {equal:.4%} equal", flush=True)
    for n, t in ((2048, 1), (4096, 1), (2880, 512)):  # the residual add and the next norm in one launch
        norm = RMSNorm(n, 1e-6).cuda().bfloat16()
        norm.weight.data = torch.randn(n, device="cuda").bfloat16()
        a, b = ((torch.randn(1, t, n, device="cuda") * 2).bfloat16() for _ in range(2))
        (ref_sum, ref), (got_sum, got) = both(lambda: add_norm(a, b, norm))
        off = ulps(got, ref)
        failures += off > 1 or not torch.equal(got_sum, ref_sum) or got.dtype != ref.dtype
        print(f"add_norm  n {n:5d} rows {t:6d}: max {off:g} ulp, sum equal {torch.equal(got_sum, ref_sum)}", flush=True)
    rotary = RotaryEmbedding(RopeConfig(theta=1e6), 128, 4096)
    rotary.build("cuda", torch.bfloat16)
    for t in (1, 512):
        q = torch.randn(1, t, 32, 128, device="cuda").bfloat16().transpose(1, 2)
        k = torch.randn(1, t, 4, 128, device="cuda").bfloat16().transpose(1, 2)
        starts = [("int", 100)]
        if t == 1:
            starts.append(("device", StaticPosition(torch.tensor([3000], device="cuda"), 4096, None)))
        for label, start in starts:
            (rq, rk), (gq, gk) = both(lambda: rotary(q, k, start))
            off = max(ulps(gq, rq), ulps(gk, rk))
            failures += off > 0
            equal = float(((gq == rq).float().mean() + (gk == rk).float().mean()) / 2)
            print(f"rotary    T {t:4d} position {label:6s}: max {off:g} ulp, {equal:.4%} equal", flush=True)
    base = ModelConfig("qwen3_moe", 32, 2048, 1, 2, 2, 32, 64, 32, 8, 2, 64, 1e-6)
    for name, (e, k, scoring, normalize, scaling) in {
            "qwen3-30b-a3b": (128, 8, "softmax", True, 1.0), "mixtral": (8, 2, "softmax", True, 1.0),
            "olmoe": (64, 8, "softmax", False, 1.0), "sigmoid x2.5": (256, 8, "sigmoid", True, 2.5)}.items():
        router = Router(dataclasses.replace(base, num_experts=e, num_experts_per_tok=k, router_scoring=scoring,
                                            norm_topk_prob=normalize, routed_scaling_factor=scaling))
        router = router.cuda().bfloat16()
        router.weight.data = (torch.randn(e, 2048, device="cuda") * 0.02).bfloat16()
        for t in (1, 512):
            x = torch.randn(t, 2048, device="cuda").bfloat16()
            given = torch.rand(t, e, device="cuda").topk(k).indices
            for label, fn in (("top-k", lambda: router(x)), ("given", lambda: router.weigh(x, given))):
                (ref_ids, ref_w), (ids, w) = both(fn)
                off = ulps(w, ref_w)
                # the same experts with the same weights; the order may differ only among equal
                # weights (bf16 logits tie often; torch.topk's sort leaves their order open)
                by_id, ref_by_id = ids.sort(-1), ref_ids.sort(-1)
                same = torch.equal(by_id.values, ref_by_id.values) and ulps(
                    w.gather(1, by_id.indices), ref_w.gather(1, ref_by_id.indices)) <= 1
                reordered = int((ids != ref_ids).any(-1).sum())
                failures += off > 1 or not same or w.dtype != ref_w.dtype
                equal = float((w == ref_w).float().mean())
                print(f"router    {name:13s} T {t:4d} {label:5s}: experts {'same' if same else 'DIFFER'} "
                      f"({reordered} rows order tied ones otherwise), weights max {off:g} ulp, {equal:.4%} equal",
                      flush=True)
    for k, h in ((8, 2048), (2, 4096), (8, 7168)):  # a token's weighted sum of its expert rows (fused.combine)
        rows = (torch.randn(k, h, device="cuda") * 4).bfloat16()
        weights = torch.softmax(torch.randn(k, device="cuda"), 0).bfloat16()
        order = torch.randperm(k, device="cuda")
        expected = torch.zeros(h, device="cuda")
        for j in range(k):  # the definition, one float32 operation at a time
            expected = expected + (rows[(order == j).nonzero()[0, 0]].float() * weights[j].float()).bfloat16().float()
        got, in_order = fused.combine(rows, weights, order), fused.combine(rows[order.argsort()], weights)
        off = max(ulps(got[0], expected.bfloat16()), ulps(in_order[0], expected.bfloat16()))
        failures += off > 0
        print(f"combine   k {k} H {h:5d}: max {off:g} ulp from its definition (sorted rows and router order)", flush=True)
    for e, k in ((128, 8), (8, 2), (256, 8)):  # the grouped decode's plan (fused.group_plan)
        ids = torch.randperm(e, device="cuda")[:k]
        x = torch.randn(1, 2048, device="cuda").bfloat16()
        rows, order, ends = fused.group_plan(x, ids, e)
        values, expected = torch.sort(ids)
        same = (torch.equal(rows, x.expand(k, -1)) and torch.equal(order, expected) and torch.equal(
            ends, torch.searchsorted(values, torch.arange(e, device="cuda"), right=True, out_int32=True)))
        failures += not same
        print(f"plan      {e:3d} experts top-{k}: {'same as' if same else 'DIFFERS from'} sort and searchsorted",
              flush=True)
    print("dense kernels: " + ("ok" if not failures else f"{failures} FAILED"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
