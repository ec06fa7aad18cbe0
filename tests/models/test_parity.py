"""Invariant 1: our logits equal transformers' on the same tiny random checkpoint (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from dymoe.checkpoint.reader import Checkpoint
from dymoe.models.transformer import load_dense
from dymoe.runtime.resident import ResidentExperts
from tests.tiny_models import FAMILIES, make_hf_model, save_checkpoint


def load_ours(path, context_len=128):
    checkpoint = Checkpoint.open(path)
    model = load_dense(checkpoint, context_len, "cpu", torch.float32)
    model.attach_experts(ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.float32))
    return model


def assert_logits_match(ours, hf, batch=3, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, hf.config.vocab_size, (batch, length), generator=generator)
    with torch.no_grad():
        expected = hf(tokens).logits.float()
    actual = ours(tokens, 0, ours.new_cache(batch))
    rel = (actual - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4, f"max relative logit difference {rel:.2e}"
    # Routing must actually vary, or the test would not exercise the experts.
    assert expected.std() > 0


def greedy_ids(ours, prompt, n):
    cache = ours.new_cache(1)
    logits = ours(prompt.view(1, -1), 0, cache, last_only=True)[0]
    out = []
    for i in range(n):
        token = int(logits.argmax())
        out.append(token)
        logits = ours(torch.tensor([[token]]), prompt.numel() + i, cache, last_only=True)[0]
    return out


def hf_greedy_ids(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(prompt.view(1, -1), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, prompt.numel():].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family):
    path, hf = checkpoints[family]
    assert_logits_match(load_ours(path), hf)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(checkpoints, family):
    path, hf = checkpoints[family]
    prompt = torch.tensor([1, 17, 42, 5, 63, 8, 29])
    assert greedy_ids(load_ours(path), prompt, 16) == hf_greedy_ids(hf, prompt, 16)


def test_incremental_decode_equals_full_forward(checkpoints):
    """Decoding token by token through the KV cache gives the full forward's logits."""
    path, _ = checkpoints["qwen3_moe"]
    ours = load_ours(path)
    tokens = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(3))
    full = ours(tokens, 0, ours.new_cache(1))[0]
    cache = ours.new_cache(1)
    steps = [ours(tokens[:, :4], 0, cache)[0]]
    steps.append(ours(tokens[:, 4:7], 4, cache)[0])  # a chunk at an offset uses the explicit mask
    steps += [ours(tokens[:, i : i + 1], i, cache)[0] for i in range(7, 10)]
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_sharded_checkpoint(tmp_path, family):
    hf = make_hf_model(family, seed=1)
    path = save_checkpoint(hf, tmp_path / "sharded", sharded=True)
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    assert_logits_match(load_ours(path), hf)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_expert_layout(tmp_path, family):
    hf = make_hf_model(family, seed=2)
    path = save_checkpoint(hf, tmp_path / "fused", fused=True)
    checkpoint = Checkpoint.open(path)
    assert checkpoint.fused_experts
    assert_logits_match(load_ours(path), hf)


@pytest.mark.parametrize(
    "family,rope",
    [
        ("qwen3_moe", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
        ("mixtral", {"rope_type": "linear", "factor": 2.0}),
        ("olmoe", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}),
        ("qwen2_moe", {"rope_type": "dynamic", "factor": 2.0}),
    ],
)
def test_rope_scaling(tmp_path, family, rope):
    hf = make_hf_model(family, seed=4, rope_parameters={"rope_theta": 10000.0, **rope})
    path = save_checkpoint(hf, tmp_path / "rope")
    ours = load_ours(path)
    assert ours.config.rope.rope_type == rope["rope_type"]
    assert_logits_match(ours, hf, length=40)


def test_legacy_rope_scaling_spelling(tmp_path):
    """Hub configs written by transformers 4 say rope_theta + rope_scaling {"type": ...}."""
    import json

    hf = make_hf_model("qwen3_moe", seed=5, rope_parameters={"rope_theta": 5000.0, "rope_type": "linear",
                                                            "factor": 3.0})
    path = save_checkpoint(hf, tmp_path / "legacy")
    raw = json.loads((path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 3.0})
    (path / "config.json").write_text(json.dumps(raw))
    assert_logits_match(load_ours(path), hf)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_tied_embeddings(tmp_path, family):
    hf = make_hf_model(family, seed=6, tie_word_embeddings=True)
    path = save_checkpoint(hf, tmp_path / "tied")
    assert not Checkpoint.open(path).has("lm_head.weight")
    assert_logits_match(load_ours(path), hf)


def test_qwen3_dense_layers_between_moe_layers(tmp_path):
    hf = make_hf_model("qwen3_moe", seed=7, mlp_only_layers=[1], num_hidden_layers=4, decoder_sparse_step=1)
    path = save_checkpoint(hf, tmp_path / "mixed")
    ours = load_ours(path)
    assert ours.config.moe_layers == (0, 2, 3)
    assert_logits_match(ours, hf)


def test_olmoe_clip_qkv(tmp_path):
    hf = make_hf_model("olmoe", seed=8, clip_qkv=0.05)
    assert_logits_match(load_ours(save_checkpoint(hf, tmp_path / "clip")), hf)


# DeepSeek's switches, each against transformers: the query path (direct or low-rank), routing
# (greedy, group-limited, V3's biased sigmoid with or without renormalisation), how many leading
# layers are dense, YaRN with the mscale that also sharpens the attention softmax, RoPE layout.
DEEPSEEK_YARN = {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16,
                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.707}


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("deepseek_v2", dict(q_lora_rank=12)),
        ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
        ("deepseek_v2", dict(first_k_dense_replace=2, num_hidden_layers=4)),
        ("deepseek_v2", dict(first_k_dense_replace=0, rope_parameters=DEEPSEEK_YARN, max_position_embeddings=640)),
        ("deepseek_v3", dict(norm_topk_prob=False, rope_interleave=False)),
        ("deepseek_v3", dict(q_lora_rank=None, rope_parameters=DEEPSEEK_YARN, max_position_embeddings=640)),
    ],
    ids=["q-lora", "group-limited", "two-dense-layers", "yarn", "v3-plain-rope", "v3-yarn"],
)
def test_deepseek_variants(tmp_path, family, overrides):
    hf = make_hf_model(family, seed=9, **overrides)
    ours = load_ours(save_checkpoint(hf, tmp_path / "deepseek"), context_len=128)
    c = ours.config
    assert c.moe_layers == tuple(range(hf.config.first_k_dense_replace, c.num_layers))
    assert c.latent_attention.q_lora_rank == hf.config.q_lora_rank
    assert_logits_match(ours, hf, length=40)
    prompt = torch.tensor([1, 17, 42, 5, 63, 8, 29])
    assert greedy_ids(ours, prompt, 16) == hf_greedy_ids(hf, prompt, 16)


# Phi-MoE's LongRoPE: every position of a sequence is rotated with the set its length selects
# (short factors and short_mscale up to original_max_position_embeddings, long ones beyond), so a
# sequence that grows past it is run again from position 0, as transformers' generate does.
PHIMOE_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                   "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [1.0, 1.5, 2.0, 3.0],
                   "short_mscale": 1.1, "long_mscale": 1.3}


def test_phimoe_longrope_scale_switch_matches_transformers(tmp_path):
    """Short and long sets differ in their scale only, which transformers 5 switches on the
    sequence length too: prompts on both sides of 16 tokens, and a generation that crosses it."""
    hf = make_hf_model("phimoe", seed=10, rope_parameters=PHIMOE_LONGROPE)
    ours = load_ours(save_checkpoint(hf, tmp_path / "longrope"))
    assert ours.rotary.switch == 16 and ours.new_cache(1).tokens is not None
    assert_logits_match(ours, hf, length=12)
    assert_logits_match(ours, hf, length=40)
    prompt = torch.tensor([1, 17, 42, 5, 63, 8, 29])
    expected = hf_greedy_ids(hf, prompt, 16)  # positions 7..22: the cache is dropped at 16
    cache = ours.new_cache(1)
    logits = ours(prompt.view(1, -1), 0, cache, last_only=True)[0]
    sequence = prompt.tolist()
    for token in expected:
        with torch.no_grad():
            reference = hf(torch.tensor([sequence])).logits[0, -1]  # the whole sequence, no cache
        assert int(logits.argmax()) == token
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
        logits = ours(torch.tensor([[token]]), len(sequence), cache, last_only=True)[0]
        sequence.append(token)


def test_phimoe_longrope_factors_follow_transformers_longrope_parameters(tmp_path):
    """Distinct factor sets: up to 16 tokens the model equals transformers; the tables are those of
    transformers' _compute_longrope_parameters at each length (short set at 16, long at 17).

    transformers 5's PhimoeRotaryEmbedding calls that function without the sequence length, so it
    rotates long sequences with the short factors; its earlier releases and Microsoft's modelling
    code for Phi-3.5-MoE pass the length, and so does dymoe."""
    from transformers.modeling_rope_utils import _compute_longrope_parameters

    rope = {**PHIMOE_LONGROPE, "long_factor": [2.0, 4.0, 8.0, 16.0]}
    hf = make_hf_model("phimoe", seed=11, rope_parameters=rope)
    ours = load_ours(save_checkpoint(hf, tmp_path / "longrope"))
    assert_logits_match(ours, hf, length=16)
    prompt = torch.tensor([1, 17, 42, 5])
    assert greedy_ids(ours, prompt, 12) == hf_greedy_ids(hf, prompt, 12)  # 16 tokens in all
    positions = torch.arange(ours.context_len, dtype=torch.float32)[:, None]
    tables = {}
    for length, mscale in ((16, 1.1), (17, 1.3)):
        inv_freq, _ = _compute_longrope_parameters(hf.config, seq_len=length)
        angles = torch.cat([positions * inv_freq] * 2, dim=-1)
        tables[length] = angles.cos() * mscale
    short, long = tables[16], tables[17]
    assert not torch.allclose(short[1:], long[1:])
    torch.testing.assert_close(ours.rotary.cos[:16], short[:16], rtol=0, atol=1e-6)  # steps of sequences <= 16
    torch.testing.assert_close(ours.rotary.cos[16:], long[16:], rtol=0, atol=1e-6)  # steps of sequences > 16
    torch.testing.assert_close(ours.rotary.cos_long, long, rtol=0, atol=1e-6)  # prompts and re-runs past 16


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_projections_still_match_transformers(checkpoints, family, monkeypatch):
    """Linear layers that read the same input as one GEMM (CUDA's path, forced here on the CPU):
    q, k and v (biases: Qwen2-MoE, GPT-OSS; q/k norms per head and over the whole projection:
    Qwen3, OLMoE), MLA's first query and key-value projections (DeepSeek), gate and up of dense
    and shared-expert MLPs (DeepSeek, Qwen2-MoE). The same logits and greedy tokens as
    transformers'; the layers' weights become views of the fused one (no second copy); a move or
    cast of the parameters drops it and fuses again, with the same logits."""
    from dymoe.models import layers

    monkeypatch.setattr(layers, "fuse_projections", lambda x: True)
    path, hf = checkpoints[family]
    ours = load_ours(path)
    assert_logits_match(ours, hf)
    fusing = [m for m in ours.modules() if isinstance(m, layers.FusedProjections)]
    fused = [(m, name, entry) for m in fusing for name, entry in m._fused.items()]
    counts = {"qkv": 0, "q_kv_a": 0, "gate_up": 0}
    for m, name, (weight, bias) in fused:
        counts[name] += 1
        projs = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj"),
                 "q_kv_a": ("q_a_proj" if hasattr(m, "q_a_proj") else "q_proj", "kv_a_proj_with_mqa")}[name]
        offset = 0
        for proj in (getattr(m, attr) for attr in projs):  # each a view at its place in the fused weight
            assert proj.weight.data_ptr() == weight.data_ptr() + offset * weight.element_size(), (name, proj)
            offset += proj.weight.numel()
        assert offset == weight.numel() and (bias is None) == (getattr(m, projs[0]).bias is None)
    config = ours.config
    assert counts["q_kv_a" if config.latent_attention is not None else "qkv"] == config.num_layers, counts
    has_mlp = config.shared_expert_intermediate_size or len(config.moe_layers) < config.num_layers
    assert (counts["gate_up"] > 0) == bool(has_mlp), counts
    prompt = torch.tensor([1, 17, 42, 5, 63, 8, 29])
    assert greedy_ids(ours, prompt, 8) == hf_greedy_ids(hf, prompt, 8)
    before = ours(prompt.view(1, -1), 0, ours.new_cache(1))
    ours.apply(lambda m: m._apply(torch.clone, recurse=False))  # as a move does: new parameters
    assert all(not m._fused for m in fusing)
    torch.testing.assert_close(ours(prompt.view(1, -1), 0, ours.new_cache(1)), before, rtol=0, atol=0)
    assert sum(len(m._fused) for m in fusing) == len(fused)
