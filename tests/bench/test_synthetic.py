"""Synthetic real-shape models: configs as published, toy builds that run, seeded determinism."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from dymoe.bench.synthetic import (
    SYNTHETIC_SHAPES, build_expert_layer, build_synthetic, parse_model_spec, synthetic_config, tiny_config,
)
from dymoe.cli.main import main
from dymoe.errors import InputError
from dymoe.models.transformer import MoETransformer
from dymoe.runtime.resident import ResidentExperts

# name -> (family, hidden, layers, heads, kv heads, head_dim, experts, top-k, expert width, vocab)
PUBLISHED = {
    "qwen3-30b-a3b": ("qwen3_moe", 2048, 48, 32, 4, 128, 128, 8, 768, 151936),
    "mixtral-8x7b": ("mixtral", 4096, 32, 32, 8, 128, 8, 2, 14336, 32000),
    "olmoe-1b-7b": ("olmoe", 2048, 16, 16, 16, 128, 64, 8, 1024, 50304),
    "qwen2-moe-a2.7b": ("qwen2_moe", 2048, 24, 16, 16, 128, 60, 4, 1408, 151936),
    "deepseek-v2-lite": ("deepseek_v2", 2048, 27, 16, 16, 192, 64, 6, 1408, 102400),
    "phi-3.5-moe": ("phimoe", 4096, 32, 32, 8, 128, 16, 2, 6400, 32064),
    "gpt-oss-20b": ("gpt_oss", 2880, 24, 64, 8, 64, 32, 4, 2880, 201088),
}
FIRST_DENSE_LAYERS = {"deepseek-v2-lite": 1}
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "resident_decode.py"


@pytest.mark.parametrize("name", sorted(SYNTHETIC_SHAPES))
def test_configs_have_the_published_shapes(name):
    c = synthetic_config(name)
    assert (c.family, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.num_experts,
            c.num_experts_per_tok, c.moe_intermediate_size, c.vocab_size) == PUBLISHED[name]
    assert c.moe_layers == tuple(range(FIRST_DENSE_LAYERS.get(name, 0), c.num_layers))


def test_family_switches():
    qwen3, olmoe, qwen2 = (synthetic_config(n) for n in ("qwen3-30b-a3b", "olmoe-1b-7b", "qwen2-moe-a2.7b"))
    assert qwen3.qk_norm == "per_head" and qwen3.norm_topk_prob and qwen3.rope.theta == 1e6
    assert olmoe.qk_norm == "full" and not olmoe.norm_topk_prob
    assert qwen2.shared_expert_intermediate_size == 5632 and qwen2.attention_bias
    assert synthetic_config("mixtral-8x7b").qk_norm is None


def test_deepseek_v2_lite_as_published():
    """Latent attention, shared experts and YaRN as in the config.json; 15.7 B parameters in all, as
    the model card says (counted on the meta device, nothing allocated)."""
    c = synthetic_config("deepseek-v2-lite")
    m = c.latent_attention
    assert (m.kv_lora_rank, m.q_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (512, None, 128, 64, 128)
    assert c.shared_expert_intermediate_size == 2 * 1408 and not c.shared_expert_gate
    assert c.intermediate_size == 10944 and c.topk_method == "greedy" and c.routed_scaling_factor == 1.0
    assert (c.rope.rope_type, c.rope.factor, c.rope.original_max_position, c.rope.mscale_all_dim) == ("yarn", 40.0, 4096, 0.707)
    with torch.device("meta"):
        dense = sum(p.numel() for p in MoETransformer(c, 16).parameters())
    total = dense + len(c.moe_layers) * c.num_experts * c.expert_params
    assert round(total / 1e9, 1) == 15.7


def test_phi_3_5_moe_as_published():
    """LayerNorms, biased attention and LM head, sparsemixer routing; 41.9 B parameters of which
    6.6 B active per token, as the model card says (counted on the meta device)."""
    c = synthetic_config("phi-3.5-moe")
    assert (c.norm, c.rms_norm_eps, c.attention_bias, c.o_proj_bias, c.lm_head_bias) == ("layer", 1e-5, True, True, True)
    assert (c.topk_method, c.router_jitter_eps, c.norm_topk_prob, c.rope.theta) == ("sparsemixer", 0.01, False, 1e4)
    with torch.device("meta"):
        model = MoETransformer(c, 16)
    assert isinstance(model.model.norm, torch.nn.LayerNorm) and model.lm_head.bias is not None
    dense = sum(p.numel() for p in model.parameters())
    assert round((dense + len(c.moe_layers) * c.num_experts * c.expert_params) / 1e9, 1) == 41.9
    assert round((dense + len(c.moe_layers) * 2 * c.expert_params) / 1e9, 1) == 6.6


def test_gpt_oss_20b_as_published():
    """Sinks, sliding windows on every other layer from the first, biased router and experts with
    the clamped SwiGLU, YaRN; 20.9 B parameters of which 3.6 B active per token besides the
    embedding table, as the model card says (21 B and 3.6 B; counted on the meta device)."""
    c = synthetic_config("gpt-oss-20b")
    assert (c.sliding_window, c.sliding_layers) == (128, tuple(range(0, 24, 2)))
    assert c.attention_sinks and c.attention_bias and c.o_proj_bias and c.router_bias and c.expert_bias
    assert (c.expert_activation, c.swiglu_limit, c.rms_norm_eps) == ("gpt_oss", 7.0, 1e-5)
    r = c.rope
    assert (r.rope_type, r.theta, r.factor, r.original_max_position, r.truncate) == ("yarn", 150000.0, 32.0, 4096, False)
    assert c.max_position_embeddings == 131072
    with torch.device("meta"):
        model = MoETransformer(c, 16)
    dense = sum(p.numel() for p in model.parameters())
    assert round((dense + len(c.moe_layers) * c.num_experts * c.expert_params) / 1e9, 1) == 20.9
    embedding = c.vocab_size * c.hidden_size
    assert round((dense - embedding + len(c.moe_layers) * 4 * c.expert_params) / 1e9, 1) == 3.6
    assert synthetic_config("gpt-oss-20b", layers=3).sliding_layers == (0, 2)


def test_gpt_oss_expert_layer_has_biases():
    config = tiny_config(synthetic_config("gpt-oss-20b", layers=1))
    gate_up, down, gate_up_bias, down_bias = build_expert_layer(config, 0, "cpu", torch.bfloat16, seed=3)
    e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size
    assert gate_up.shape == (e, 2 * i, h) and down.shape == (e, h, i)
    assert gate_up_bias.shape == (e, 2 * i) and down_bias.shape == (e, h) and gate_up_bias.std() > 0


def test_gpt_oss_20b_decodes_through_bench(tmp_path):
    """``dymoe bench --model synthetic:gpt-oss-20b --tiny --layers 2`` on the CPU: offloaded bf16
    (lru) exactly as resident, static-int4 completes close to it."""
    out = tmp_path / "bench.json"
    status = main(["bench", "--model", "synthetic:gpt-oss-20b", "--tiny", "--layers", "2", "--policies",
                   "lru,static-int4", "--prompt-len", "8", "--gen-len", "4", "--device-memory", "50%", "--device", "cpu",
                   "--no-progress", "--json", str(out)])
    assert status == 0
    resident, lru, int4 = json.loads(out.read_text())["rows"]
    assert lru["quality"]["top1_agreement"] == 1.0 and lru["quality"]["kl_mean"] == 0.0
    assert 0 < int4["quality"]["kl_mean"] < 0.1


def test_deepseek_v2_lite_decodes_through_bench(tmp_path, capsys):
    """``dymoe bench --model synthetic:deepseek-v2-lite --tiny --layers 2`` on the CPU: a dense layer
    and an MoE layer decode a few tokens, offloaded (lru, bf16) exactly as resident."""
    out = tmp_path / "bench.json"
    status = main(["bench", "--model", "synthetic:deepseek-v2-lite", "--tiny", "--layers", "2", "--policies", "lru",
                   "--prompt-len", "8", "--gen-len", "4", "--device-memory", "50%", "--device", "cpu",
                   "--no-progress", "--json", str(out)])
    assert status == 0
    assert "lru@50%" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"]["shape"] == "deepseek-v2-lite" and report["model"]["layers"] == 2
    resident, lru = report["rows"]
    assert (resident["preset"], lru["preset"]) == ("resident", "lru")
    assert lru["quality"]["positions"] == 4 and lru["quality"]["top1_agreement"] == 1.0
    assert lru["quality"]["kl_mean"] == 0.0


def test_layers_override():
    c = synthetic_config("qwen3-30b-a3b", layers=4)
    assert c.num_layers == 4 and c.moe_layers == (0, 1, 2, 3)
    with pytest.raises(InputError, match="48 layers"):
        synthetic_config("qwen3-30b-a3b", layers=49)


def test_parse_model_spec():
    assert parse_model_spec("synthetic:qwen3-30b-a3b") == "qwen3-30b-a3b"
    assert parse_model_spec("/models/Qwen3-30B-A3B") is None
    with pytest.raises(InputError, match="synthetic:mixtral-8x7b"):
        parse_model_spec("synthetic:gpt-9")


@pytest.mark.parametrize("name", sorted(SYNTHETIC_SHAPES))
def test_tiny_model_runs_forward_and_decode(name):
    config = tiny_config(synthetic_config(name, layers=2))
    model, experts = build_synthetic(config, "cpu", torch.float32, seed=1, context_len=16)
    model.attach_experts(ResidentExperts(experts))
    cache = model.new_cache(2)
    tokens = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = model(tokens, 0, cache)
    assert logits.shape == (2, 5, config.vocab_size) and torch.isfinite(logits).all()
    step = model(tokens[:, :1], 5, cache, last_only=True)
    assert step.shape == (2, config.vocab_size)
    assert logits[0, -1].std() > 0  # random weights give non-degenerate logits


def test_expert_stacks_shapes_and_dtypes():
    config = tiny_config(synthetic_config("qwen3-30b-a3b", layers=3))
    model, experts = build_synthetic(config, "cpu", torch.bfloat16, context_len=8)
    e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size
    assert sorted(experts) == [0, 1, 2]
    for gate_up, down in experts.values():
        assert gate_up.shape == (e, 2 * i, h) and down.shape == (e, h, i)
        assert gate_up.dtype == down.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)
    assert abs(float(experts[0][0].float().std()) - 0.02) < 0.002


def test_experts_go_to_their_own_device_and_real_shape_layer_is_right():
    config = synthetic_config("olmoe-1b-7b", layers=1)
    gate_up, down = build_expert_layer(config, 0, "cpu", torch.bfloat16)
    assert gate_up.shape == (64, 2048, 2048) and down.shape == (64, 2048, 1024)
    assert gate_up.device.type == "cpu"


def _state(model, experts):
    return {**{n: p.clone() for n, p in model.named_parameters()},
            **{f"experts.{l}.{j}": t.clone() for l, pair in experts.items() for j, t in enumerate(pair)}}


def test_same_seed_same_weights_other_seed_other_weights():
    config = tiny_config(synthetic_config("qwen2-moe-a2.7b", layers=2))
    a = _state(*build_synthetic(config, "cpu", torch.float32, seed=7, context_len=8))
    b = _state(*build_synthetic(config, "cpu", torch.float32, seed=7, context_len=8))
    c = _state(*build_synthetic(config, "cpu", torch.float32, seed=8, context_len=8))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["experts.0.0"], c["experts.0.0"])
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_a_shallow_model_is_a_prefix_of_a_deeper_one():
    base = tiny_config(synthetic_config("qwen3-30b-a3b", layers=3))
    deep = _state(*build_synthetic(base, "cpu", torch.float32, seed=3, context_len=8))
    shallow_config = tiny_config(synthetic_config("qwen3-30b-a3b", layers=2))
    shallow = _state(*build_synthetic(shallow_config, "cpu", torch.float32, seed=3, context_len=8))
    assert all(torch.equal(shallow[k], deep[k]) for k in shallow)


def test_router_init_hook_is_used_for_every_router():
    config = tiny_config(synthetic_config("qwen3-30b-a3b", layers=2))
    seen = []

    def skewed(layer, weight, generator):
        seen.append(layer)
        weight.zero_()
        weight[0] = 1.0

    model, _ = build_synthetic(config, "cpu", torch.float32, context_len=8, router_init=skewed)
    assert seen == [0, 1]
    assert float(model.model.layers[1].mlp.gate.weight[0].min()) == 1.0


def test_resident_decode_benchmark_smoke(tmp_path):
    """The GPU benchmark's CPU mode: dymoe and transformers on shared weights agree in float32."""
    module = runpy.run_path(str(BENCHMARK))
    report = module["main"](["--device", "cpu", "--layers", "2", "--tiny", "--dtype", "float32",
                             "--out", str(tmp_path)])
    assert (tmp_path / "resident_decode.json").exists()
    assert not report["failures"]
    for check in report["correctness"].values():
        assert check["prefill_next_token_equal"] and check["decode_argmax_agreement"] == 1.0
        assert check["prefill_logits_rel_diff"] < 1e-5
    assert report["results"]["dymoe"]["fit"]["tpot_48_s"] > 0
