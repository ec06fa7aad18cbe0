"""The fused dense kernels (dymoe/models/fused.py) against the torch code they replace.

Under Triton's interpreter, in float32 and bit for bit in bf16 (the kernels round to bf16 by bit
arithmetic, as a GPU must not fold it away; the GPU side is benchmarks/check_dense_kernels.py); on
a CPU without the interpreter the torch code runs, which every other test covers. The interpreter
runs in a subprocess, as in tests/quant/test_kernels.py: ``TRITON_INTERPRET`` only takes effect for
kernels (Triton's own included) defined after it is set, and other tests import Triton first.
"""

from __future__ import annotations

import pytest
import torch

import dymoe.models.fused as fused
from dymoe.errors import InputError
from tests.interpreted import needs_gpu, needs_triton, run_interpreted


_INTERPRETED = """
import json
import torch
import dymoe.models.fused as fused
from dymoe.models.config import RopeConfig
from dymoe.models.layers import RMSNorm, RotaryEmbedding, StaticPosition


def both(fn):
    fused.ENABLED = False
    ref = fn()
    fused.ENABLED = True
    return ref, fn()


def compare(ref, got):
    return {"shape": list(got.shape) == list(ref.shape), "dtype": str(got.dtype), "ref_dtype": str(ref.dtype),
            "max_abs": float((got.float() - ref.float()).abs().max()), "max_ref": float(ref.float().abs().max()),
            "equal": torch.equal(got, ref)}


results = {}
torch.manual_seed(0)
# RMSNorm: rows of a power of two and not (a masked tail), per-head norms ([B, T, heads, D]) and a
# weight of another dtype (the result takes the promoted dtype, as in torch); one large value, so
# the sum of squares is not dominated by rounding
for n, shape, weight_dtype in ((256, (1, 3), torch.float32), (128, (1, 2, 32), torch.float32),
                               (96, (5,), torch.float32), (100, (2,), torch.bfloat16)):
    norm = RMSNorm(n, 1e-6)
    norm.weight.data = torch.randn(n).to(weight_dtype)
    x = torch.randn(*shape, n) * 3
    x[..., 0] = 400.0
    results[f"norm/{n}/{len(shape)}/{weight_dtype}"] = compare(*both(lambda: norm(x)))
# rotary, float32: q and k as the attention hands them over ([B, heads, T, D] views of [B, T, heads,
# D]), at an integer start (prefill) and at a position read from the device (decode)
rotary = RotaryEmbedding(RopeConfig(theta=1e6), 64, 32)
rotary.build("cpu", torch.float32)
q = torch.randn(2, 5, 6, 64).transpose(1, 2)
k = torch.randn(2, 5, 2, 64).transpose(1, 2)
for name, start, qq, kk in (("int", 7, q, k), ("device", StaticPosition(torch.tensor([19]), 32, None),
                                               q[:, :, :1], k[:, :, :1])):
    (rq, rk), (gq, gk) = both(lambda: rotary(qq, kk, start))
    results[f"rotary/{name}/q"] = dict(compare(rq, gq), moved=float((gq - qq).abs().max()))
    results[f"rotary/{name}/k"] = compare(rk, gk)
# bf16: rotary bit for bit; RMSNorm but for the float32 sum's order
torch.manual_seed(1)
rotary = RotaryEmbedding(RopeConfig(theta=1e6), 128, 64)
rotary.build("cpu", torch.bfloat16)
q = torch.randn(1, 5, 8, 128).bfloat16().transpose(1, 2)
k = torch.randn(1, 5, 2, 128).bfloat16().transpose(1, 2)
(rq, rk), (gq, gk) = both(lambda: rotary(q, k, 11))
results["bf16/rotary/q"], results["bf16/rotary/k"] = compare(rq, gq), compare(rk, gk)
norm = RMSNorm(2048, 1e-6).bfloat16()
norm.weight.data = torch.randn(2048).bfloat16()
x = (torch.randn(4, 2048) * 3).bfloat16()
ref, got = both(lambda: norm(x))
ulps = (got.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
results["bf16/norm"] = dict(compare(ref, got), max_ulps=int(ulps.max()), equal_share=float((ulps == 0).float().mean()))
# the residual add and the next norm in one launch, against the add then the norm kernel (bit for
# bit: the same sum, the same roundings) and the torch code (the sum of squares' order), in bf16 over
# a decode row and a prefill's rows of a width that is not a power of two
from dymoe.models.layers import add_norm
torch.manual_seed(5)
for rows, n in ((1, 2048), (7, 1000)):
    norm = RMSNorm(n, 1e-6).bfloat16()
    norm.weight.data = torch.randn(n).bfloat16()
    a, b = (torch.randn(1, rows, n) * 3).bfloat16(), (torch.randn(1, rows, n) * 3).bfloat16()
    (ref_sum, ref), (got_sum, got) = both(lambda: add_norm(a, b, norm))
    kernels_ = (a + b, fused.rms_norm(a + b, norm.weight, norm.eps))
    ulps = (got.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    results[f"add_norm/{rows}x{n}"] = dict(sum=torch.equal(got_sum, ref_sum), kernels=torch.equal(got, kernels_[1]),
                                           max_ulps=int(ulps.max()), shape=list(got.shape), dtype=str(got.dtype),
                                           applies=fused.add_rms_norm_applies(a, b, norm.weight))
# routers: the fused route kernel against the torch code; (experts, k, tokens, scoring, norm_topk_prob,
# scaling, dtype): Qwen3's shape, Qwen2-MoE's (no renormalisation, 60 experts: a masked tail),
# DeepSeek's scaled sigmoid, Mixtral's top-2 in bf16 over a prefill's rows
import dataclasses
from dymoe.models.config import ModelConfig
from dymoe.models.moe import Router
base = ModelConfig("qwen3_moe", 32, 64, 1, 2, 2, 32, 64, 32, 8, 2, 64, 1e-6)
torch.manual_seed(2)
for name, (e, k, n, scoring, normalize, scaling, dtype) in {
        "qwen3": (128, 8, 1, "softmax", True, 1.0, torch.float32),
        "qwen2": (60, 4, 3, "softmax", False, 1.0, torch.float32),
        "deepseek": (64, 6, 2, "sigmoid", True, 2.5, torch.float32),
        "mixtral-bf16": (8, 2, 16, "softmax", True, 1.0, torch.bfloat16)}.items():
    router = Router(dataclasses.replace(base, num_experts=e, num_experts_per_tok=k, router_scoring=scoring,
                                        norm_topk_prob=normalize, routed_scaling_factor=scaling)).to(dtype)
    router.weight.data = (torch.randn(e, 64) * 0.2).to(dtype)
    x = torch.randn(n, 64).to(dtype)
    (ref_ids, ref_w), (ids, w) = both(lambda: router(x))
    given = torch.stack([torch.randperm(e)[:k] for _ in range(n)])  # synthetic routing's weigh()
    (ref_gids, ref_gw), (gids, gw) = both(lambda: router.weigh(x, given))
    results[f"route/{name}"] = dict(compare(ref_w, w), ids=torch.equal(ids, ref_ids), id_dtype=str(ids.dtype),
                                    given=compare(ref_gw, gw), given_ids=torch.equal(gids, ref_gids),
                                    spread=float(ref_w.float().max() - ref_w.float().min()))
# combine: k expert rows to one token's output, rows in router order or sorted by expert (``order``),
# against its definition evaluated by torch one float32 operation at a time; and gathered_decode's
# bf16 sum goes through it
from dymoe.runtime.resident import gathered_decode
torch.manual_seed(4)
for k, h in ((8, 2048), (2, 300)):
    rows = (torch.randn(k, h) * 4).bfloat16()
    weights = torch.softmax(torch.randn(k), 0).bfloat16()
    order = torch.randperm(k)
    expected = torch.zeros(h)
    for j in range(k):
        row = rows[(order == j).nonzero()[0, 0]]
        expected = expected + (row.float() * weights[j].float()).bfloat16().float()
    got = fused.combine(rows, weights, order)
    unordered = rows[order.argsort()]  # row j is router slot j's
    results[f"combine/{k}"] = dict(sorted=torch.equal(got, expected.bfloat16()[None]),
                                   ordered=torch.equal(fused.combine(unordered, weights), got),
                                   shape=list(got.shape), dtype=str(got.dtype))
x = torch.randn(1, 64).bfloat16()
gate_up, down = (torch.randn(4, 48, 64) * 0.2).bfloat16(), (torch.randn(4, 64, 24) * 0.2).bfloat16()
ids, weights = torch.tensor([3, 0]), torch.tensor([0.7, 0.3]).bfloat16()
y = torch.stack([down[e] @ (torch.nn.functional.silu(gate_up[e, :24] @ x[0]) * (gate_up[e, 24:] @ x[0])) for e in ids.tolist()])
results["combine/gathered"] = dict(equal=torch.equal(gathered_decode(x, ids, weights, gate_up, down),
                                                     fused.combine(y, weights)),
                                   torch_sum=torch.equal(gathered_decode(x, ids, weights, gate_up, down),
                                                         (weights[:, None] * y).sum(0, keepdim=True)))
# group_plan: the grouped decode's rows, sort and group ends against torch's sort and search
for name, e, ids in (("qwen3", 128, torch.randperm(128)[:8]), ("qwen2", 60, torch.randperm(60)[:4]),
                     ("repeats", 16, torch.tensor([5, 2, 5, 0, 15, 2]))):
    x = torch.randn(1, 300).bfloat16()
    rows, order, ends = fused.group_plan(x, ids, e)
    stable = torch.sort(ids, stable=True)
    results[f"plan/{name}"] = dict(
        rows=torch.equal(rows, x.expand(len(ids), -1)), order=torch.equal(order, stable.indices),
        ends=torch.equal(ends, torch.searchsorted(stable.values, torch.arange(e), right=True, out_int32=True)),
        dtypes=[str(order.dtype), str(ends.dtype)])
# one token through a linear layer (linear_decode) and a router's logits with its routing (route_decode):
# integer inputs, so every float32 sum is exact whatever its order and the outputs must equal F.linear's
# bit for bit; shapes with masked row and column tails, one K slice or several, the default cut and
# others; a second call must give the same (the counters were reset)
torch.manual_seed(6)
def ints(*shape, spread=3):
    return torch.randint(-spread, spread + 1, shape).bfloat16()
from dymoe.models.fused import LinearConfig, linear_config, linear_decode, route_decode, _COUNTERS
for name, (n, k, bias, config) in {
        "one-slice": (37, 300, True, LinearConfig(16, 128, 1, 3)),
        "split": (37, 300, False, LinearConfig(8, 64, 3, 2)),
        "split-tail": (130, 1000, True, LinearConfig(32, 256, 2, 2)),
        "default": (96, 512, False, None)}.items():
    w, x, b = ints(n, k), ints(1, 1, k), ints(n) if bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float() if b is not None else None).bfloat16()
    first, second = linear_decode(x, w, b, config), linear_decode(x, w, b, config)
    results[f"linear/{name}"] = dict(equal=torch.equal(first, ref), again=torch.equal(second, ref),
                                     shape=list(first.shape), dtype=str(first.dtype),
                                     spread=float(ref.float().max() - ref.float().min()))
results["linear/config"] = [list(dataclasses.astuple(linear_config(n, k, 264))) for n, k in
                            ((5120, 2048), (2048, 4096), (128, 2048), (8, 4096), (37, 100))]
for name, (e, k, scoring, normalize, scaling, bias, config) in {
        "qwen3": (128, 8, "softmax", True, 1.0, False, None),
        "qwen2": (60, 4, "softmax", False, 1.0, False, LinearConfig(16, 32, 2, 1)),
        "deepseek": (64, 6, "sigmoid", True, 2.5, False, LinearConfig(64, 64, 1, 1)),
        "gpt-oss": (32, 4, "softmax", True, 1.0, True, LinearConfig(8, 32, 2, 1))}.items():
    router = Router(dataclasses.replace(base, num_experts=e, num_experts_per_tok=k, router_scoring=scoring,
                                        norm_topk_prob=normalize, routed_scaling_factor=scaling,
                                        router_bias=bias)).bfloat16()
    router.weight.data = ints(e, 64) / 16
    x = ints(1, 64)
    router.weight.data[e - 1] = x[0].sign() / 16  # the last expert (the logits' masked tail) among the best
    if bias:
        router.bias.data = ints(e) / 4
    given = torch.randperm(e)[:k][None]
    logits = torch.nn.functional.linear(x.float(), router.weight.float(),
                                        router.bias.float() if bias else None).bfloat16()
    ref = fused.route(logits, k, sigmoid=router.sigmoid, normalize=normalize, scaling=scaling, dtype=x.dtype)
    ref_given = fused.route(logits, k, sigmoid=router.sigmoid, normalize=normalize, scaling=scaling,
                            dtype=x.dtype, ids=given)
    args = dict(sigmoid=router.sigmoid, normalize=normalize, scaling=scaling, config=config)
    got = route_decode(x, router.weight, router.bias, k, **args)
    got_given = route_decode(x, router.weight, router.bias, k, ids=given, **args)
    again = route_decode(x, router.weight, router.bias, k, **args)
    results[f"route_decode/{name}"] = dict(
        ids=torch.equal(got[0], ref[0]), weights=torch.equal(got[1], ref[1]),
        given_ids=torch.equal(got_given[0], ref_given[0]), given_weights=torch.equal(got_given[1], ref_given[1]),
        again=torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1]),
        used=router._route_decode_applies(x), distinct=int(logits.unique().numel()),
        ref_ids=ref[0].tolist(), experts=e, shapes=[list(got[0].shape), list(got[1].shape)])
# a router that packs the MoE input for an int4, int3 or int2 expert step as it routes: the words of
# the step's own packing launch, bit for bit (poisoned first: all written), the routing unchanged;
# widths with a tail of a packing piece and of a chunk; the default cut, a split one, one program
from dymoe.quant.kernels import InputPacking
from dymoe.quant.kernels.split_k import _pack_input_kernel
from dymoe.quant.kernels.triton_experts import PACK_BLOCK, chunk_values, packed_words
for name, (h, bits, config) in {"int4": (2560, 4, None), "int3": (1000, 3, LinearConfig(8, 128, 4, 2)),
                                "int2": (2600, 2, LinearConfig(32, 1024, 1, 3))}.items():  # (one program: every piece)
    router = Router(dataclasses.replace(base, hidden_size=h, num_experts=24, num_experts_per_tok=4)).bfloat16()
    router.weight.data = torch.randn(24, h).bfloat16() / 16
    x = torch.randn(1, h).bfloat16() * 3
    pack = InputPacking(torch.full((packed_words(h, bits),), -1, dtype=torch.int32), bits, h)
    ref = torch.full_like(pack.buffer, -2)
    _pack_input_kernel[(-(-h // PACK_BLOCK),)](x, ref, H=h, C=-(-h // chunk_values(bits)), BITS=bits, BLOCK=PACK_BLOCK,
                                               num_warps=4)
    args = dict(sigmoid=False, normalize=True, scaling=1.0, config=config)
    plain, packing = route_decode(x, router.weight, None, 4, **args), route_decode(x, router.weight, None, 4, pack=pack, **args)
    try:
        route_decode(x[:, :-1].contiguous(), router.weight[:, :-1].contiguous(), None, 4, pack=pack, **args)
        refused = ""
    except ValueError as error:
        refused = str(error)
    results[f"route_decode/pack/{name}"] = dict(
        words=torch.equal(pack.buffer, ref), written=int((ref == -2).sum()), size=ref.numel(),
        routing=torch.equal(plain[0], packing[0]) and torch.equal(plain[1], packing[1]),
        packs=router.packs(x, pack), refused=refused)
results["linear/counters_zero"] = int(_COUNTERS[torch.device("cpu")].abs().sum())
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(_INTERPRETED)


@needs_triton
def test_rms_norm_kernel_matches_the_module(interpreted):
    norms = {name: r for name, r in interpreted.items() if name.startswith("norm/")}
    assert len(norms) == 4
    for name, r in norms.items():
        assert r["shape"] and r["dtype"] == r["ref_dtype"] == "torch.float32", name
        assert r["max_abs"] <= 1e-6 + 2e-6 * r["max_ref"] and r["max_ref"] > 0.5, (name, r)


@needs_triton
def test_rotary_kernel_matches_the_module(interpreted):
    for name in ("rotary/int/q", "rotary/int/k", "rotary/device/q", "rotary/device/k"):
        r = interpreted[name]
        assert r["shape"] and r["dtype"] == "torch.float32" and r["max_abs"] <= 1e-6 + 1e-6 * r["max_ref"], (name, r)
    for name in ("rotary/int/q", "rotary/device/q"):  # (a rotation that did nothing would pass at position 0)
        assert interpreted[name]["moved"] > 0.1


@needs_triton
def test_the_residual_add_and_the_norm_in_one_launch(interpreted):
    """``add_norm``: the sum as torch's bf16 add rounds it, the norm bit for bit the norm kernel's
    on that sum, and within one unit in the last place of the torch code."""
    for name in ("add_norm/1x2048", "add_norm/7x1000"):
        r = interpreted[name]
        assert r["applies"] and r["sum"] and r["kernels"] and r["max_ulps"] <= 1, (name, r)
        assert r["dtype"] == "torch.bfloat16" and r["shape"][-1] in (2048, 1000), (name, r)


@needs_triton
def test_route_kernel_matches_the_router(interpreted):
    """A router's scores, top-k (or given experts put in order), renormalisation, scale and cast in
    one kernel: the same experts in the same order as the torch code, the same weights within
    float32 rounding (the softmax sum's order), in bf16 equal, for both choices (a trained
    router's top-k and synthetic routing's given experts)."""
    assert {name for name in interpreted if name.startswith("route/")} == {
        "route/qwen3", "route/qwen2", "route/deepseek", "route/mixtral-bf16"}
    for name in ("route/qwen3", "route/qwen2", "route/deepseek", "route/mixtral-bf16"):
        r = interpreted[name]
        assert r["ids"] and r["given_ids"] and r["id_dtype"] == "torch.int64", (name, r)
        assert r["shape"] and r["dtype"] == r["ref_dtype"] and r["spread"] > 0.01, (name, r)
        for weights in (r, r["given"]):
            if r["dtype"] == "torch.bfloat16":
                assert weights["equal"], (name, weights)
            else:
                assert weights["max_abs"] <= 1e-6 * weights["max_ref"], (name, weights)


@needs_triton
def test_combine_kernel_sums_as_defined(interpreted):
    """A token's weighted sum of its expert rows: bit for bit each product rounded to bf16, summed
    in router order in float32, rounded once; rows sorted by expert (with ``order``) or in router
    order give the same output; gathered_decode's bf16 sum is this kernel's."""
    for k in (8, 2):
        r = interpreted[f"combine/{k}"]
        assert r["sorted"] and r["ordered"] and r["dtype"] == "torch.bfloat16" and r["shape"][0] == 1, (k, r)
    assert interpreted["combine/gathered"]["equal"]


@needs_triton
def test_group_plan_kernel_equals_sort_and_search(interpreted):
    """The grouped decode's plan in one kernel: the token's k rows, the stable sort of its expert
    ids (distinct ones, as a router's, and repeated ones) and each expert's end, as torch's sort
    and searchsorted give them, with their dtypes."""
    for name in ("plan/qwen3", "plan/qwen2", "plan/repeats"):
        r = interpreted[name]
        assert r["rows"] and r["order"] and r["ends"] and r["dtypes"] == ["torch.int64", "torch.int32"], (name, r)


@needs_triton
def test_a_decode_token_through_a_linear_layer_in_one_launch(interpreted):
    """``linear_decode`` equals ``F.linear`` bit for bit where every float32 sum is exact (integer
    inputs): row and column tails, one K slice or several (the last of a row block sums them), a
    bias; a second call the same (its counters were reset, and are all zero after the runs). The
    default cut (for an H100's 264 programs) splits K only where the row blocks are fewer than the
    programs aimed at: Qwen3's router, Mixtral's."""
    for name in ("linear/one-slice", "linear/split", "linear/split-tail", "linear/default"):
        r = interpreted[name]
        assert r["equal"] and r["again"] and r["dtype"] == "torch.bfloat16" and r["spread"] > 4, (name, r)
        assert r["shape"][:2] == [1, 1], (name, r)
    # (block_n, block_k, split, steps, warps): Qwen3's qkv, o_proj and router, Mixtral's router, a tail
    assert interpreted["linear/config"] == [[8, 512, 1, 4, 4], [8, 512, 1, 8, 4], [8, 512, 4, 1, 4],
                                            [8, 512, 8, 1, 4], [8, 128, 1, 1, 4]]
    assert interpreted["linear/counters_zero"] == 0


@needs_triton
def test_a_routers_logits_and_its_routing_in_one_launch(interpreted):
    """``route_decode``: the same experts and weights, bit for bit, as ``route`` on F.linear's
    logits, for a trained router's top-k and for given experts (synthetic routing), softmax or
    sigmoid, renormalised or not, scaled, GPT-OSS's bias; the Router takes this path for a bf16
    decode token."""
    for name in ("route_decode/qwen3", "route_decode/qwen2", "route_decode/deepseek", "route_decode/gpt-oss"):
        r = interpreted[name]
        assert r["used"] and r["ids"] and r["weights"] and r["given_ids"] and r["given_weights"], (name, r)
        assert r["again"] and r["distinct"] > 8 and r["shapes"][0] == r["shapes"][1], (name, r)
        assert r["experts"] - 1 in r["ref_ids"][0], (name, r)  # the masked tail is read


@needs_triton
def test_a_router_packs_the_expert_steps_input_as_it_routes(interpreted):
    """``route_decode(pack=...)`` writes the MoE input as the int4, int3 and int2 steps' packed
    activation vector, word for word what the step's own packing launch writes (every word, with
    piece and chunk tails, split or not), and routes as without; a router input of another width
    is refused with a message."""
    for name in ("int4", "int3", "int2"):
        r = interpreted[f"route_decode/pack/{name}"]
        assert r["words"] and r["written"] == 0 and r["size"] > 100, (name, r)
        assert r["routing"] and r["packs"], (name, r)
        assert "cannot be packed for a step of" in r["refused"], (name, r)


@needs_gpu
def test_a_router_packs_the_expert_steps_input_on_the_gpu():
    """Compiled on a GPU, at the routers' real shapes, whose K is split over several programs
    (Qwen3-30B-A3B: 4 slices, Mixtral-8x7B: 8; the first version failed to compile there, which the
    tiny models' unsplit routers never showed): the packing launch's words bit for bit and the same
    routing. (CI has no GPU: ``python -m pytest tests/models/test_fused.py``.)"""
    from dymoe.quant.kernels import InputPacking
    from dymoe.quant.kernels.split_k import _pack_input_kernel
    from dymoe.quant.kernels.triton_experts import PACK_BLOCK, chunk_values, packed_words

    torch.manual_seed(0)
    for experts, h in ((128, 2048), (8, 4096)):
        assert fused.linear_config(experts, h, 2 * torch.cuda.get_device_properties(0).multi_processor_count).split > 1
        weight = (torch.randn(experts, h, device="cuda") / h**0.5).bfloat16()
        x = torch.randn(1, h, device="cuda").bfloat16()
        for bits in (4, 3, 2):
            pack = InputPacking(torch.full((packed_words(h, bits),), -1, dtype=torch.int32, device="cuda"), bits, h)
            ref = torch.full_like(pack.buffer, -2)
            _pack_input_kernel[(-(-h // PACK_BLOCK),)](x, ref, H=h, C=-(-h // chunk_values(bits)), BITS=bits,
                                                       BLOCK=PACK_BLOCK, num_warps=4)
            args = dict(sigmoid=False, normalize=True, scaling=1.0)
            plain = fused.route_decode(x, weight, None, 2, **args)
            packing = fused.route_decode(x, weight, None, 2, pack=pack, **args)
            assert torch.equal(pack.buffer, ref), (experts, h, bits)
            assert torch.equal(plain[0], packing[0]) and torch.equal(plain[1], packing[1]), (experts, h, bits)


def _check_setting(monkeypatch, name: str, read, values: dict, bad: str, first: str) -> None:
    """Environment variable ``name`` read by ``read()``: each of ``values`` (unset as "") gives its
    setting, and ``bad`` is one clear error naming the variable and ``first``, its first choice."""
    for value, expected in values.items():
        monkeypatch.setenv(name, value)
        assert read() == expected, (name, value)
    monkeypatch.setenv(name, bad)
    with pytest.raises(InputError, match=f"{name}='{bad}': use {first}"):
        read()


def test_fused_kernels_only_where_they_apply(monkeypatch):
    """Off on a CPU tensor without the interpreter (the torch code runs: CI's path) and when
    DYMOE_FUSED_DENSE=0; a bad value is one clear error."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused, "ENABLED", True)
    assert not fused.fused_applies(torch.zeros(4))
    _check_setting(monkeypatch, "DYMOE_FUSED_DENSE", fused._setting, {"": True, "1": True, "0": False}, "off", "1")


def test_linear_decode_only_where_it_applies(monkeypatch):
    """``DYMOE_DECODE_LINEAR``: ``triton`` by default, ``cublas`` off, a bad value one clear error.
    ``linear_decode`` takes one row of bf16 or float16 with a weight of its dtype, contiguous; a
    prefill's rows, float32, a mixed dtype, a transposed weight or a strided bias take F.linear.
    ``layers.Linear`` goes through it only where it applies (the Router's use: the interpreted
    ``route_decode`` test)."""
    from dymoe.models import layers

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _check_setting(monkeypatch, "DYMOE_DECODE_LINEAR", fused._decode_linear_setting,
                   {"": "triton", "triton": "triton", "cublas": "cublas"}, "cutlass", "triton")
    monkeypatch.setattr(fused, "ENABLED", True)
    monkeypatch.setattr(fused, "DECODE_LINEAR", "triton")
    w, x = torch.zeros(16, 32, dtype=torch.bfloat16), torch.zeros(1, 1, 32, dtype=torch.bfloat16)
    assert not fused.linear_decode_applies(x, w)  # a CPU tensor without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as the interpreter runs them
    monkeypatch.setattr(fused, "triton_available", lambda: True)
    assert fused.linear_decode_applies(x, w) and fused.linear_decode_applies(x, w, torch.zeros(16, dtype=w.dtype))
    assert not fused.linear_decode_applies(x, w, w[:, 0])  # a strided bias
    assert not fused.linear_decode_applies(torch.zeros(1, 2, 32, dtype=torch.bfloat16), w)  # two rows
    assert not fused.linear_decode_applies(x.float(), w.float())
    assert not fused.linear_decode_applies(x, w.half())
    assert not fused.linear_decode_applies(x, w, w[:, 0].float())
    assert not fused.linear_decode_applies(x, torch.zeros(32, 16, dtype=torch.bfloat16).t())
    calls = []
    monkeypatch.setattr(layers, "linear_decode", lambda *args: calls.append(args) or torch.ones(1, 1, 16))
    layer = layers.Linear(32, 16, bias=False).bfloat16()
    assert torch.equal(layer(x), torch.ones(1, 1, 16)) and len(calls) == 1
    assert layer(torch.zeros(1, 3, 32, dtype=torch.bfloat16)).shape == (1, 3, 16) and len(calls) == 1
    monkeypatch.setattr(fused, "DECODE_LINEAR", "cublas")
    assert not fused.linear_decode_applies(x, w)
    layer(x)
    assert len(calls) == 1


def test_the_moe_block_asks_the_router_to_pack_only_where_it_can(monkeypatch):
    """A runtime that offers an InputPacking gets ``packed_input=`` only where the router's
    one-launch route runs (the interpreter's setting below); on a CPU without it, or for several
    rows, the block neither asks the router nor names a packing, and a router asked anyway refuses
    with a message. A runtime that offers none is called as before (no keyword)."""
    from dymoe.models.config import ModelConfig
    from dymoe.models.moe import MoEBlock
    from dymoe.quant.kernels import InputPacking

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused, "ENABLED", True)
    monkeypatch.setattr(fused, "DECODE_LINEAR", "triton")
    block = MoEBlock(ModelConfig("qwen3_moe", 32, 64, 1, 2, 2, 32, 64, 32, 8, 2, 64, 1e-6), 0).bfloat16()
    pack = InputPacking(torch.zeros(32, dtype=torch.int32), 4, 64)
    calls = []

    class Packing:
        def input_packing(self, layer):
            return pack

        def run_experts(self, layer, hidden, ids, weights, **extra):
            calls.append(extra)
            return torch.zeros_like(hidden)

    class Plain:
        def run_experts(self, layer, hidden, ids, weights):
            calls.append("plain")
            return torch.zeros_like(hidden)

    block.experts = Packing()
    x = torch.randn(1, 1, 64).bfloat16()
    assert block.input_packing(x.view(1, 64)) is None  # a CPU tensor without the interpreter
    block(x)
    with pytest.raises(ValueError, match="cannot pack its input for the expert step here"):
        block.gate(x.view(1, 64), pack)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as the interpreter runs them
    monkeypatch.setattr(fused, "triton_available", lambda: True)
    assert block.input_packing(x.view(1, 64)) is pack and block.gate.packs(x.view(1, 64), pack)
    assert block.input_packing(torch.randn(2, 64).bfloat16()) is None  # a prefill's rows
    assert not block.gate.packs(x.view(1, 64), InputPacking(pack.buffer, 4, 128))  # another width
    assert not block.gate.packs(x.view(1, 64).float(), pack)
    monkeypatch.setattr(fused, "route_decode", lambda *args, pack=None, **kw: (
        calls.append(("route", pack)) or (torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2).bfloat16())))
    block(x)
    block.experts = Plain()
    block(x)
    assert calls == [{}, ("route", pack), {"packed_input": pack}, ("route", None), "plain"]


def test_the_split_decode_attention_only_where_it_applies(monkeypatch):
    """``DYMOE_DECODE_ATTENTION``: ``split`` by default, ``sdpa`` off, a bad value one clear error;
    never for a CPU tensor without the interpreter, a float32 query or a batch of two."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _check_setting(monkeypatch, "DYMOE_DECODE_ATTENTION", fused._attention_setting,
                   {"": "split", "split": "split", "sdpa": "sdpa"}, "flash", "split")
    monkeypatch.setattr(fused, "ATTENTION", "split")
    monkeypatch.setattr(fused, "ENABLED", True)
    assert not fused.decode_attention_applies(torch.zeros(1, 8, 1, 64, dtype=torch.bfloat16))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as the interpreter runs them
    monkeypatch.setattr(fused, "triton_available", lambda: True)
    assert fused.decode_attention_applies(torch.zeros(1, 8, 1, 64, dtype=torch.bfloat16))
    assert not fused.decode_attention_applies(torch.zeros(1, 8, 1, 64))
    assert not fused.decode_attention_applies(torch.zeros(2, 8, 1, 64, dtype=torch.bfloat16))
    monkeypatch.setattr(fused, "ATTENTION", "sdpa")
    assert not fused.decode_attention_applies(torch.zeros(1, 8, 1, 64, dtype=torch.bfloat16))


@needs_triton
def test_bf16_outputs_equal_the_torch_ones_bit_for_bit(interpreted):
    """In bf16 the two products and the sum of the rotary embedding, and the normalised value and
    the weighted one of RMSNorm, round as the torch ops round (round to nearest even): the rotary
    outputs are identical, the norms identical but for the float32 sum's order (at most one unit
    in the last place, in a few values)."""
    assert interpreted["bf16/rotary/q"]["equal"] and interpreted["bf16/rotary/k"]["equal"]
    norm = interpreted["bf16/norm"]
    assert norm["dtype"] == "torch.bfloat16" and norm["max_ulps"] <= 1 and norm["equal_share"] > 0.99
