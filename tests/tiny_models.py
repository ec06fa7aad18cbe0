"""Tiny random checkpoints of every supported family, written by transformers (the test oracle)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss")

# Small but not degenerate: several experts per token, GQA, more than one layer, and an init
# scale large enough that routing differs between tokens.
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, rms_norm_eps=1e-6)
FAMILY_KW = {
    "qwen3_moe": dict(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                      head_dim=8),
    "qwen2_moe": dict(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                      shared_expert_intermediate_size=40),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(num_experts=8, num_experts_per_tok=3, clip_qkv=None),
    # MLA with a value head narrower than the query/key head, one leading dense layer, two shared
    # experts, and a routed scaling factor; one KV head per query head, as MLA expands them.
    "deepseek_v2": dict(moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                        first_k_dense_replace=1, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=1.5),
    "deepseek_v3": dict(moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                        first_k_dense_replace=1, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=20,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5),
    # Biased q/k/v/o and LM head; a jitter margin wide enough that sparsemixer's softmaxes often
    # keep a second expert (at the published 0.01 nearly every weight is exactly 1).
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
                   router_jitter_noise=0.3),
    # Sliding-window layers (0 and 2) with a window shorter than the test prompts, sinks, and a
    # SwiGLU clamp low enough that it cuts (at the published 7.0 a tiny model never reaches it).
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=3, head_dim=8, sliding_window=5, swiglu_limit=1.0,
                    rms_norm_eps=1e-5, max_position_embeddings=131072),
}


def hf_classes(family: str):
    import transformers as tf

    return {
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM),
        "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM),
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM),
        "phimoe": (tf.PhimoeConfig, tf.PhimoeForCausalLM),
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM),
    }[family]


def make_hf_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls = hf_classes(family)
    kwargs = {**BASE, **FAMILY_KW[family], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # transformers starts DeepSeek-V3's routing bias at zero; make it matter
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.05)
        if family == "phimoe":  # likewise every bias (zero) and LayerNorm weight (one)
            for name, param in model.named_parameters():
                if name.endswith(".bias") or "norm" in name:
                    param.add_(torch.randn_like(param), alpha=0.1)
        if family == "gpt_oss":  # transformers starts expert biases at zero and sinks near it: make them matter
            for name, param in model.named_parameters():
                if name.endswith("_proj_bias"):
                    param.normal_(0.0, 0.5)
                elif name.endswith("sinks"):
                    param.normal_(0.0, 2.0)
    return model


def save_checkpoint(model, path: Path, sharded: bool = False, fused: bool = False) -> Path:
    """Write ``model`` as a hub checkpoint: per-expert tensors (save_pretrained), optionally
    sharded, or the fused 3-D expert layout (transformers 5's in-memory tensors, saved as they are)."""
    if fused:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(path, max_shard_size="20KB" if sharded else "10GB")
    return path


def open_store(checkpoint, path: Path, precisions: tuple[str, ...], group_size: int = 64):
    """``checkpoint``'s experts converted to ``precisions`` at ``path``, opened."""
    from dymoe.checkpoint.convert import convert_store
    from dymoe.checkpoint.store import ExpertStore

    return ExpertStore.open(convert_store(checkpoint, path, precisions=precisions, group_size=group_size,
                                          progress=False))


def tiny_store(root: Path, family: str, seed: int, precisions: tuple[str, ...], **overrides):
    """(checkpoint, store): a tiny bf16 ``family`` checkpoint written under ``root`` (bf16, so the
    store's bf16 copies are exact) and its expert store in ``precisions`` at group size 64."""
    from dymoe.checkpoint.reader import Checkpoint

    checkpoint = Checkpoint.open(save_checkpoint(make_hf_model(family, seed=seed, **overrides).to(torch.bfloat16),
                                                 root / "m"))
    return checkpoint, open_store(checkpoint, root / "store", precisions)


def greedy_trail(model, prompt: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """[steps, vocab] logits of ``model`` (its experts attached): the prompt's last, then those of
    ``steps - 1`` greedy decode steps, each fed its own argmax."""
    cache = model.new_cache(1)
    logits = model(prompt, 0, cache, last_only=True)[0]
    trail = []
    for i in range(steps):
        trail.append(logits)
        logits = model(logits.argmax().view(1, 1), prompt.shape[1] + i, cache, last_only=True)[0]
    return torch.stack(trail)
