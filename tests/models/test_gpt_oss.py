"""GPT-OSS beyond the shared parity tests: its config.json as published, its MXFP4 release format,
sliding-window attention with sinks across chunks and cache offsets, and the CUDA-graph decode."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dymoe.checkpoint.reader import Checkpoint
from dymoe.checkpoint.store import ExpertStore
from dymoe.errors import UnsupportedModelError
from dymoe.models import decode_graphs, layers
from dymoe.models.registry import parse_config
from dymoe.models.transformer import load_dense
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.presets import PRESETS
from tests.models.test_decode_graphs import decode_both
from tests.models.test_parity import assert_logits_match, greedy_ids, hf_greedy_ids, load_ours
from tests.tiny_models import make_hf_model, open_store, save_checkpoint

# Spelled as openai/gpt-oss-20b's config.json (transformers-4 keys), at toy widths.
HUB = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 320, "hidden_size": 64,
    "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 2, "experts_per_token": 2,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "sliding_window": 128, "attention_bias": True, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 150000, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                           "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                           "truncate": False},
    "swiglu_limit": 7.0, "tie_word_embeddings": False, "eos_token_id": 200002, "pad_token_id": 199999,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}


# ---- config.json ---------------------------------------------------------------------------------


def test_hub_config():
    c = parse_config(HUB)
    assert (c.family, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.moe_layers) == (
        "gpt_oss", 8, 2, 64, (0, 1, 2, 3))
    assert (c.sliding_window, c.sliding_layers, c.attention_window(0), c.attention_window(1)) == (128, (0, 2), 128, None)
    assert c.attention_sinks and c.attention_bias and c.o_proj_bias and c.router_bias
    assert (c.expert_activation, c.expert_bias, c.swiglu_limit, c.swiglu_alpha) == ("gpt_oss", True, 7.0, 1.702)
    assert c.norm_topk_prob and c.topk_method == "greedy" and c.router_scoring == "softmax"
    r = c.rope
    assert (r.rope_type, r.theta, r.factor, r.original_max_position, r.truncate) == ("yarn", 150000.0, 32.0, 4096, False)
    assert c.expert_params == 3 * 64 * 64 + 2 * 64 + 64  # biases included


def test_absent_keys_take_transformers_defaults():
    """A config written without the optional keys reads as transformers' GptOssConfig fills them in."""
    from transformers import GptOssConfig

    minimal = {"architectures": ["GptOssForCausalLM"], "vocab_size": 320, "hidden_size": 64, "intermediate_size": 64,
               "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 8,
               "num_experts_per_tok": 2}
    ours = parse_config(minimal)
    theirs = parse_config(GptOssConfig(**{k: v for k, v in minimal.items() if k != "architectures"}).to_dict())
    assert ours == theirs
    assert ours.sliding_layers == (0, 2, 4) and ours.sliding_window == 128 and ours.head_dim == 64
    assert (ours.rope.theta, ours.rope.factor, ours.rope.truncate) == (150000.0, 32.0, False)


def test_quantization_methods_other_than_gpt_oss_mxfp4_are_refused():
    with pytest.raises(UnsupportedModelError, match=r"pre-quantized checkpoint \(fp8\)"):
        parse_config({**HUB, "quantization_config": {"quant_method": "fp8"}}, source="m/config.json")
    qwen = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "moe_intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 2,
            "quantization_config": {"quant_method": "mxfp4"}}
    with pytest.raises(UnsupportedModelError, match=r"m/config.json describes a pre-quantized checkpoint \(mxfp4\)"):
        parse_config(qwen, source="m/config.json")


def test_layer_types_must_name_every_layer():
    with pytest.raises(UnsupportedModelError, match="3 entries .* for 4 layers"):
        parse_config({**HUB, "layer_types": HUB["layer_types"][:3]})
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        parse_config({**HUB, "layer_types": ["chunked_attention"] * 4})


# ---- attention: sliding windows and sinks ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = make_hf_model("gpt_oss", seed=3)
    return save_checkpoint(hf, tmp_path_factory.mktemp("gpt_oss") / "m"), hf


def test_the_tiny_model_exercises_windows_sinks_and_clamps(tiny):
    """The shared parity tests (tests/models/test_parity.py) only mean something for GPT-OSS if the
    tiny model's window is shorter than their prompts, its sinks are not negligible and its clamp cuts."""
    path, hf = tiny
    c = load_ours(path).config
    assert c.sliding_layers == (0, 2) and c.sliding_window == 5 < 12
    sinks = hf.model.layers[0].self_attn.sinks
    assert sinks.abs().max() > 1.0
    assert c.swiglu_limit == 1.0 and hf.model.layers[0].mlp.experts.gate_up_proj_bias.abs().max() > 0.5


def test_long_prompts_run_in_chunks_of_queries(tiny, monkeypatch):
    """A prompt whose scores exceed SCORE_BYTES is attended a few queries at a time: same logits."""
    path, hf = tiny
    ours = load_ours(path)
    whole = ours(torch.arange(3, 43).view(1, -1), 0, ours.new_cache(1))
    monkeypatch.setattr(layers, "SCORE_BYTES", 4 * 8 * 40 * 7)  # 7 queries per chunk
    chunked = ours(torch.arange(3, 43).view(1, -1), 0, ours.new_cache(1))
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert_logits_match(ours, hf, batch=2, length=40)


def test_incremental_decode_equals_full_forward(tiny):
    """Chunks at offsets read only the keys of their window: the same logits as one forward."""
    ours = load_ours(tiny[0])
    tokens = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    full = ours(tokens, 0, ours.new_cache(2))
    cache = ours.new_cache(2)
    steps = [ours(tokens[:, :6], 0, cache), ours(tokens[:, 6:13], 6, cache)]
    steps += [ours(tokens[:, i : i + 1], i, cache) for i in range(13, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_the_hub_spelling_of_rope_and_expert_count(tiny, tmp_path):
    """openai/gpt-oss-20b's config.json says rope_theta + rope_scaling and experts_per_token (the
    transformers-4 keys): the same model as transformers' own spelling."""
    import shutil

    path, hf = tiny
    legacy = shutil.copytree(path, tmp_path / "legacy")
    raw = json.loads((legacy / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, experts_per_token=raw["num_experts_per_tok"])
    (legacy / "config.json").write_text(json.dumps(raw))
    ours = load_ours(legacy)
    assert ours.config == load_ours(path).config
    assert_logits_match(ours, hf)


@pytest.mark.parametrize("preset", ["lru", "static-int4"])
def test_graph_decode_of_offloaded_experts(tiny, tmp_path, monkeypatch, preset):
    """bf16 slots (biases read in place) and low-bit ones (the fused kernels read the biases from
    the blobs and apply the clamped activation) are both computed inside the graph segments."""
    monkeypatch.setattr(decode_graphs, "MIN_SPAN", 8)
    checkpoint = Checkpoint.open(tiny[0])
    store = open_store(checkpoint, tmp_path / "s", ("bf16", "int4"))
    model = load_dense(checkpoint, 40, "cpu", torch.float32)
    c = checkpoint.config
    budget = 2 * c.num_experts_per_tok * store.layout("bf16").nbytes
    experts = OffloadedExperts(store, OffloadConfig(budget_bytes=budget, **PRESETS[preset]), c.num_experts_per_tok,
                               "cpu", torch.float32)
    plain, segmented, graphs = decode_both(model, experts)
    torch.testing.assert_close(segmented, plain, rtol=1e-5, atol=1e-5)
    assert graphs.deferred


# ---- the MXFP4 release format ----------------------------------------------------------------------


def write_mxfp4_checkpoint(path, seed: int = 0, **overrides):
    """A tiny GPT-OSS checkpoint whose experts are stored as the hub release stores them: MXFP4
    ``*_blocks`` / ``*_scales`` ([E, out, in/32, ...]) and a quantization_config. Returns the folder
    and a transformers model holding the same experts dequantized (by transformers' own code)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = make_hf_model("gpt_oss", seed=seed, intermediate_size=64, **overrides)  # widths: whole 32-blocks
    c = hf.config
    e, h, i = c.num_local_experts, c.hidden_size, c.intermediate_size
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for layer, block in enumerate(hf.model.layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        for name, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
            blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
            scales = torch.randint(122, 126, (e, rows, cols // 32), dtype=torch.uint8, generator=gen)
            with torch.no_grad():
                getattr(block.mlp.experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            del state[prefix + name]
            state[prefix + name + "_blocks"], state[prefix + name + "_scales"] = blocks, scales
    path.mkdir(parents=True)
    c.save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"] = HUB["quantization_config"]
    (path / "config.json").write_text(json.dumps(raw))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path, hf


def test_mxfp4_checkpoint_matches_transformers(tmp_path):
    path, hf = write_mxfp4_checkpoint(tmp_path / "m")
    checkpoint = Checkpoint.open(path)
    assert checkpoint.mxfp4 and checkpoint.fused_experts
    gate, up, down = checkpoint.expert_weights(1, 3)
    gate_up = hf.model.layers[1].mlp.experts.gate_up_proj[3]  # [H, 2I], gate and up interleaved
    assert gate.dtype == torch.bfloat16
    assert torch.equal(gate.float(), gate_up[:, 0::2].T) and torch.equal(up.float(), gate_up[:, 1::2].T)
    assert torch.equal(down.float(), hf.model.layers[1].mlp.experts.down_proj[3].T)
    ours = load_ours(path)
    assert_logits_match(ours, hf)
    prompt = torch.tensor([1, 17, 42, 5, 63, 8, 29])
    assert greedy_ids(ours, prompt, 16) == hf_greedy_ids(hf, prompt, 16)


def test_mxfp4_folder_converts_and_generates_through_the_cli(tmp_path, capsys):
    """What a user does with the downloaded release: ``dymoe convert`` then ``dymoe generate`` with
    an offloading preset; the text equals the resident model's, whose tokens equal transformers'."""
    from dymoe.bench.random_checkpoint import train_tokenizer, write_tokenizer_files
    from dymoe.cli.main import main
    from tests.cli.test_cli import TEXTS, reference_text

    path, hf = write_mxfp4_checkpoint(tmp_path / "m", seed=1, vocab_size=320)
    tokenizer = train_tokenizer(TEXTS, 300)
    write_tokenizer_files(path, tokenizer)
    assert main(["convert", str(path), "--precisions", "bf16,int4", "--group-size", "64", "--verify",
                 "--no-progress"]) == 0
    assert "every checksum verified" in capsys.readouterr().out
    store = ExpertStore.open(path / "dymoe-store")
    assert store.layout("int4").has_bias and store.layout("bf16").has_bias
    budget = 2 * hf.config.num_experts_per_tok * store.layout("bf16").nbytes
    assert main(["generate", "-m", str(path), "the fox", "-n", "10", "--device", "cpu", "--policy", "lru",
                 "--device-memory", str(budget), "--no-progress"]) == 0
    offloaded = capsys.readouterr().out
    assert offloaded == reference_text(path, "the fox", 10) + "\n"
    prompt = torch.tensor(tokenizer.encode("the fox").ids)
    ours = load_ours(path)
    assert greedy_ids(ours, prompt, 10) == hf_greedy_ids(hf, prompt, 10)


def test_inspect_counts_mxfp4_experts_as_weights(tmp_path):
    """``dymoe inspect`` reads two weights a byte from MXFP4 blocks and none from their scales."""
    from dymoe.cli.inspect import describe

    path, hf = write_mxfp4_checkpoint(tmp_path / "m")
    facts = describe(Checkpoint.open(path), None, 64)
    assert facts["parameters"] == sum(p.numel() for p in hf.parameters())
    assert facts["expert_parameters"] == 3 * 8 * (3 * 32 * 64 + 2 * 64 + 32)  # 3 layers of 8 biased experts
    assert facts["attention"].endswith("attention sinks, sliding window of 5 on 2 of 3 layers")


def test_calibration_quantizes_weights_and_keeps_biases(tiny):
    """``dymoe calibrate``'s per-layer sensitivity on a model with biased experts: the int4 round
    trip of one layer's weights changes the output, its biases are left as the store keeps them."""
    from dymoe.runtime.calibrate import calibrate

    ours = load_ours(tiny[0])
    before = {layer: tuple(t.clone() for t in stacks) for layer, stacks in ours.experts.layers.items()}
    schedule = calibrate(ours, ours.experts, list(range(3, 40)), group_size=64, critical=1)
    assert sorted(schedule.sensitivity) == [0, 1, 2] and all(kl > 0 for kl in schedule.sensitivity.values())
    assert all(torch.equal(a, b) for layer in before for a, b in zip(before[layer], ours.experts.layers[layer]))
