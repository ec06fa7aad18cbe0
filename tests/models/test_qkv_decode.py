"""One decode token's q/k norms, rotary and cache writes in one kernel (``fused.qkv_decode``)
against the kernels and torch code it replaces: bit for bit under Triton's interpreter, and the
rest of the attention unchanged. The GPU side runs the same script compiled."""

from __future__ import annotations

from tests.interpreted import needs_gpu, needs_triton, run_interpreted

SCRIPT = """
import dataclasses, json, torch
from dymoe.models import fused, layers
from dymoe.models.config import ModelConfig, RopeConfig
from dymoe.models.layers import Attention, KVCache, RotaryEmbedding, StaticPosition

device = "{device}"
results = {{}}
# (name, heads, kv heads, head dim, qk norm, attention bias): Qwen3's per-head norms, Mixtral's
# none, a head dim that is not a power of two (a masked tail), Qwen2-MoE's biases
for name, hq, hkv, d, norm, bias in {cases}:
    torch.manual_seed(hq * d)
    config = ModelConfig("qwen3_moe", 64, 96, 2, hq, hkv, d, 64, 32, 4, 2, 128, 1e-6, rope=RopeConfig(theta=1e6),
                         qk_norm=norm, attention_bias=bias)
    attn = Attention(config, 1).to(device, torch.bfloat16)
    for p in attn.parameters():  # weights off 1 (norms) and 0 (biases), so a missed step shows
        p.data = torch.randn_like(p) * (0.3 if p.dim() == 2 else 1.0) + (1.0 if p.dim() == 1 and p.shape[0] == d else 0.0)
    rotary = RotaryEmbedding(config.rope, d, 128)
    rotary.build(device, torch.bfloat16)
    x = torch.randn(1, 9, 96, device=device).bfloat16()
    token = torch.randn(1, 1, 96, device=device).bfloat16()
    runs = {{}}
    for path in ("kernel", "kernels", "torch"):
        fused.ENABLED = path != "torch"
        cache = KVCache(config, 1, 128, device, torch.bfloat16)
        attn(x, 0, cache, rotary)  # a 9-token prefill
        position = torch.tensor([9], device=device)
        start = StaticPosition(position, 64, (torch.arange(64, device=device) <= position).view(1, 64))
        if path == "kernels":
            attn._decode_inputs = lambda *args: None  # the norm and rotary kernels, cache.update
        q, k, v = attn._project(token, "qkv", (attn.q_proj, attn.k_proj, attn.v_proj))
        decoded = attn._decode_inputs(q, k, v, start, cache, rotary)
        out = attn(token, start, cache, rotary)
        runs[path] = dict(out=out, k=cache.k.clone(), v=cache.v.clone(), took=decoded is not None,
                          q=decoded[0] if decoded is not None else None)
        if path == "kernels":
            del attn._decode_inputs  # back to the method
    ref, got, torch_ = runs["kernels"], runs["kernel"], runs["torch"]
    ulps = lambda a, b: int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())
    results[name] = dict(took=[got["took"], ref["took"], torch_["took"]], out=torch.equal(got["out"], ref["out"]),
                         k=torch.equal(got["k"], ref["k"]), v=torch.equal(got["v"], ref["v"]),
                         written=bool((got["k"][1, :, :, 9] != 0).all() and (got["v"][1, :, :, 9] != 0).all()),
                         q_shape=list(got["q"].shape), torch_k_ulps=ulps(got["k"], torch_["k"]),
                         torch_out=float((got["out"].float() - torch_["out"].float()).abs().max()
                                         / torch_["out"].float().abs().max()))
print(json.dumps(results))
"""
CASES = [("qwen3", 8, 2, 64, "per_head", False), ("mixtral", 8, 4, 64, None, False),
         ("tail", 6, 2, 48, "per_head", False), ("qwen2", 4, 4, 32, None, True)]


def _check(results) -> None:
    for name, *_ in CASES:
        r = results[name]
        assert r["took"] == [True, False, False], r  # the kernel applies where asked, not on the torch path
        assert r["out"] and r["k"] and r["v"] and r["written"], (name, r)
        assert r["torch_k_ulps"] <= 1 and r["torch_out"] < 2e-2, (name, r)  # sums' orders, SDPA
    assert results["qwen3"]["q_shape"] == [1, 8, 1, 64]


@needs_triton
def test_qkv_decode_equals_the_kernels_it_replaces_under_the_interpreter():
    _check(run_interpreted(SCRIPT.format(device="cpu", cases=CASES)))


@needs_gpu
def test_qkv_decode_equals_the_kernels_it_replaces_on_the_gpu():
    _check(run_interpreted(SCRIPT.format(device="cuda", cases=CASES), interpret=False))
