"""From a Hugging Face ``config.json`` to a :class:`ModelConfig`, per supported family.

Each family is a small parser that reads the keys its checkpoints publish; everything else about
a family is a field of ModelConfig that the shared model code switches on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dymoe.errors import CheckpointError, UnsupportedModelError
from dymoe.models.config import LatentAttentionConfig, ModelConfig, RopeConfig

ConfigParser = Callable[[dict[str, Any]], dict[str, Any]]


def _required(raw: dict, key: str, *aliases: str):
    for k in (key, *aliases):
        if raw.get(k) is not None:
            return raw[k]
    raise KeyError(key)


def _eos_ids(raw: dict) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def parse_rope(raw: dict) -> RopeConfig:
    """Read RoPE settings in either the transformers-4 or the transformers-5 spelling."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported yet")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if rope_type not in ("default", "linear", "dynamic", "yarn", "llama3", "longrope"):
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported (supported: default, linear, dynamic, yarn, llama3, longrope)"
        )
    original = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
    if rope_type in ("yarn", "llama3") and original is None:
        original = raw.get("max_position_embeddings")
    if rope_type == "longrope" and original is None:
        raise KeyError("original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        stretched = rope_type in ("yarn", "longrope") and original
        factor = raw["max_position_embeddings"] / original if stretched else 1.0
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(factor),
        original_max_position=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        partial_rotary_factor=partial,
        **(_longrope(raw, params, partial) if rope_type == "longrope" else {}),
    )


def _longrope(raw: dict, params: dict, partial: float) -> dict[str, Any]:
    """LongRoPE's two factor lists (one value per rotated pair of dims, checked) and their scales."""
    head_dim = raw.get("head_dim") or _required(raw, "hidden_size") // _required(raw, "num_attention_heads")
    pairs = int(head_dim * partial) // 2
    out = {}
    for key in ("short_factor", "long_factor"):
        values = tuple(float(v) for v in _required(params, key))
        if len(values) != pairs:
            raise CheckpointError(f"config.json: rope {key} has {len(values)} values, expected {pairs} "
                                  f"(one per rotated pair of the {head_dim}-wide heads)")
        out[key] = values
    for key in ("short_mscale", "long_mscale"):
        out[key] = None if params.get(key) is None else float(params[key])
    return out


def _common(raw: dict) -> dict[str, Any]:
    hidden = _required(raw, "hidden_size")
    heads = _required(raw, "num_attention_heads")
    return dict(
        vocab_size=_required(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=_required(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope=parse_rope(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
    )


def _sparse_layers(raw: dict, num_experts: int) -> tuple[int, ...]:
    """Qwen-style interleaving: layer l is MoE unless listed in mlp_only_layers or off the step."""
    step = raw.get("decoder_sparse_step", 1) or 1
    dense = set(raw.get("mlp_only_layers") or [])
    n = raw["num_hidden_layers"]
    return tuple(l for l in range(n) if l not in dense and num_experts > 0 and (l + 1) % step == 0)


def _qwen_experts(raw: dict) -> dict[str, Any]:
    """What Qwen2-MoE and Qwen3-MoE configs share: expert counts, widths and the sparse-layer rule."""
    experts = _required(raw, "num_experts", "num_local_experts")
    return dict(
        intermediate_size=raw.get("intermediate_size", 0),
        moe_intermediate_size=_required(raw, "moe_intermediate_size"),
        num_experts=experts,
        num_experts_per_tok=_required(raw, "num_experts_per_tok"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        moe_layers=_sparse_layers(raw, experts),
    )


def _qwen3_moe(raw: dict) -> dict[str, Any]:
    return dict(_qwen_experts(raw), family="qwen3_moe", attention_bias=bool(raw.get("attention_bias", False)),
                qk_norm="per_head")


def _qwen2_moe(raw: dict) -> dict[str, Any]:
    return dict(_qwen_experts(raw), family="qwen2_moe", attention_bias=bool(raw.get("qkv_bias", True)),
                shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size", 0),
                shared_expert_gate=True)


def _mixtral(raw: dict) -> dict[str, Any]:
    width = _required(raw, "intermediate_size")
    return dict(
        family="mixtral",
        intermediate_size=width,
        moe_intermediate_size=width,
        num_experts=_required(raw, "num_local_experts", "num_experts"),
        num_experts_per_tok=_required(raw, "num_experts_per_tok"),
        norm_topk_prob=True,  # Mixtral renormalises the top-k softmax weights
        moe_layers=tuple(range(raw["num_hidden_layers"])),
    )


def _olmoe(raw: dict) -> dict[str, Any]:
    width = _required(raw, "intermediate_size")
    return dict(
        family="olmoe",
        intermediate_size=width,
        moe_intermediate_size=width,
        num_experts=_required(raw, "num_experts", "num_local_experts"),
        num_experts_per_tok=_required(raw, "num_experts_per_tok"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        qk_norm="full",
        clip_qkv=raw.get("clip_qkv"),
        moe_layers=tuple(range(raw["num_hidden_layers"])),
    )


def _deepseek(raw: dict) -> dict[str, Any]:
    """What DeepSeek-V2 and -V3 share: latent attention, leading dense layers, ungated shared experts."""
    experts = _required(raw, "n_routed_experts", "num_experts")
    width = _required(raw, "moe_intermediate_size")
    nope, rope = _required(raw, "qk_nope_head_dim"), _required(raw, "qk_rope_head_dim")
    first_dense = raw.get("first_k_dense_replace") or 0
    step = raw.get("moe_layer_freq") or 1  # DeepSeek's own code: MoE where l >= first_dense and l % step == 0
    heads = _required(raw, "num_attention_heads")
    return dict(
        head_dim=nope + rope,  # config.json's head_dim is the rope width (transformers writes it so)
        num_kv_heads=heads,  # the latent is expanded to one key and one value per query head
        intermediate_size=_required(raw, "intermediate_size"),
        moe_intermediate_size=width,
        num_experts=experts,
        num_experts_per_tok=_required(raw, "num_experts_per_tok"),
        shared_expert_intermediate_size=width * (raw.get("n_shared_experts") or 0),
        attention_bias=bool(raw.get("attention_bias", False)),
        moe_layers=tuple(l for l in range(raw["num_hidden_layers"]) if l >= first_dense and l % step == 0),
        n_group=raw.get("n_group") or 1,
        topk_group=raw.get("topk_group") or 1,
        routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
        latent_attention=LatentAttentionConfig(
            kv_lora_rank=_required(raw, "kv_lora_rank"),
            q_lora_rank=raw.get("q_lora_rank"),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=_required(raw, "v_head_dim"),
            rope_interleave=bool(raw.get("rope_interleave", True)),
        ),
    )


def _deepseek_v2(raw: dict) -> dict[str, Any]:
    # transformers 5 reads neither scoring_func nor norm_topk_prob for V2 (always softmax, never
    # renormalised, always times routed_scaling_factor); every published V2 config agrees
    # (softmax, norm_topk_prob false), so we follow it.
    method = raw.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModelError(f"DeepSeek-V2 topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    return dict(_deepseek(raw), family="deepseek_v2", topk_method=method, norm_topk_prob=False)


def _deepseek_v3(raw: dict) -> dict[str, Any]:
    # transformers 5 always routes V3 as noaux_tc: sigmoid scores, choice on scores + bias.
    return dict(_deepseek(raw), family="deepseek_v3", topk_method="noaux_tc", router_scoring="sigmoid",
                norm_topk_prob=bool(raw.get("norm_topk_prob", True)))


# transformers' GptOssConfig defaults (models/gpt_oss/configuration_gpt_oss.py), for configs that
# leave these keys out; the published openai/gpt-oss-20b and -120b configs spell them all.
GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
GPT_OSS_THETA = 150000.0


def _gpt_oss(raw: dict) -> dict[str, Any]:
    """GPT-OSS: every layer MoE; biased experts with a clamped SwiGLU; a biased router that takes the
    top-k logits and softmaxes over them (equal to renormalising the top-k of the full softmax);
    attention with q/k/v/o biases and sinks; sliding windows where ``layer_types`` says so (by
    default every other layer from the first); YaRN RoPE."""
    n = raw["num_hidden_layers"]
    types = raw.get("layer_types") or ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n)]
    if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise UnsupportedModelError(f"GPT-OSS layer_types has {len(types)} entries of {sorted(set(types))} for "
                                    f"{n} layers: expected one sliding_attention or full_attention per layer")
    window = raw.get("sliding_window", 128)
    rope_raw = {**raw, "rope_theta": raw.get("rope_theta", GPT_OSS_THETA)}
    if not (raw.get("rope_parameters") or raw.get("rope_scaling")):
        rope_raw["rope_parameters"] = GPT_OSS_ROPE
    width = _required(raw, "intermediate_size")
    bias = bool(raw.get("attention_bias", True))
    return dict(
        family="gpt_oss",
        head_dim=raw.get("head_dim") or 64,
        max_position_embeddings=raw.get("max_position_embeddings", 131072),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope=parse_rope(rope_raw),
        intermediate_size=width,
        moe_intermediate_size=width,
        num_experts=_required(raw, "num_local_experts", "num_experts"),
        num_experts_per_tok=_required(raw, "num_experts_per_tok", "experts_per_token"),
        norm_topk_prob=True,
        attention_bias=bias,
        o_proj_bias=bias,
        attention_sinks=True,
        sliding_window=window,
        sliding_layers=tuple(l for l, t in enumerate(types) if t == "sliding_attention") if window else (),
        router_bias=True,
        expert_activation="gpt_oss",
        expert_bias=True,
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
        moe_layers=tuple(range(n)),
    )


PHIMOE_THETA = 1e6  # transformers' PhimoeConfig.default_theta, for configs without rope_theta


def _phimoe(raw: dict) -> dict[str, Any]:
    """Phi-MoE (Phi-3.5-MoE): Mixtral's layout with LayerNorms (with bias) instead of RMSNorms,
    biased q/k/v/o projections and LM head when the config says so, sparsemixer top-2 routing and
    LongRoPE whose cos/sin scales are the config's short_mscale / long_mscale."""
    rope = parse_rope({**raw, "rope_theta": raw.get("rope_theta", PHIMOE_THETA)})
    if rope.rope_type not in ("default", "longrope"):
        # transformers' Phimoe scales any other RoPE variant by the longrope mscales as well
        raise UnsupportedModelError(f"Phi-MoE with rope type {rope.rope_type!r} is not supported (default, longrope)")
    if rope.rope_type == "longrope" and None in (rope.short_mscale, rope.long_mscale):
        raise KeyError("short_mscale")
    top_k = raw.get("num_experts_per_tok", 2)
    if top_k != 2:
        raise UnsupportedModelError(f"Phi-MoE's sparsemixer router picks exactly 2 experts per token (transformers "
                                    f"ignores num_experts_per_tok); this config.json asks for {top_k}")
    width = _required(raw, "intermediate_size")
    bias = bool(raw.get("attention_bias", False))
    positions = raw.get("max_position_embeddings", 131072)
    window = raw.get("sliding_window")
    return dict(
        family="phimoe",
        rope=rope,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),  # the LayerNorms' eps, under the RMSNorm key
        # Within its sliding window (131072 = max_position_embeddings for Phi-3.5-MoE) transformers'
        # sliding mask is the causal one; beyond it the attention would differ, so the context ends there.
        max_position_embeddings=min(positions, window) if window else positions,
        intermediate_size=width,
        moe_intermediate_size=width,
        num_experts=_required(raw, "num_local_experts", "num_experts"),
        num_experts_per_tok=2,
        norm_topk_prob=False,
        topk_method="sparsemixer",
        router_jitter_eps=float(raw.get("router_jitter_noise", 0.01)),
        attention_bias=bias,
        o_proj_bias=bias,
        norm="layer",
        lm_head_bias=bool(raw.get("lm_head_bias", False)),
        moe_layers=tuple(range(raw["num_hidden_layers"])),
    )


FAMILIES: dict[str, ConfigParser] = {
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "Qwen2MoeForCausalLM": _qwen2_moe,
    "MixtralForCausalLM": _mixtral,
    "OlmoeForCausalLM": _olmoe,
    "DeepseekV2ForCausalLM": _deepseek_v2,
    "DeepseekV3ForCausalLM": _deepseek_v3,
    "GptOssForCausalLM": _gpt_oss,
    "PhimoeForCausalLM": _phimoe,
    "PhiMoEForCausalLM": _phimoe,  # the hub's Phi-3.5-MoE config.json (written for its own modelling code)
}
MODEL_TYPES = {"qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe, "mixtral": _mixtral, "olmoe": _olmoe,
               "deepseek_v2": _deepseek_v2, "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss,
               "phimoe": _phimoe}


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def parse_config(raw: dict[str, Any], source: Path | str = "config.json") -> ModelConfig:
    """Build a ModelConfig; unknown architectures and missing keys raise one clear error."""
    archs = raw.get("architectures") or []
    parser = next((FAMILIES[a] for a in archs if a in FAMILIES), None) or MODEL_TYPES.get(raw.get("model_type"))
    if parser is None:
        name = ", ".join(archs) or raw.get("model_type") or "unknown"
        raise UnsupportedModelError(
            f"architecture {name} (from {source}) is not supported; supported: {', '.join(supported_architectures())}"
        )
    _check_quantization(raw, parser, source)
    try:
        fields = {**_common(raw), **parser(raw)}
    except KeyError as exc:
        raise CheckpointError(f"{source} lacks the key {exc.args[0]!r} that this architecture needs") from None
    return ModelConfig(**fields)


# Pre-quantized checkpoints a family may ship, which the checkpoint reader dequantizes: GPT-OSS's
# experts come as MXFP4 (dymoe/quant/mxfp4.py); everything else in those files is bf16.
DEQUANTIZED_ON_READ: dict[ConfigParser, tuple[str, ...]] = {_gpt_oss: ("mxfp4",)}


def _check_quantization(raw: dict, parser: ConfigParser, source) -> None:
    quantized = raw.get("quantization_config")
    if not quantized:
        return
    method = quantized.get("quant_method", "unknown") if isinstance(quantized, dict) else "unknown"
    if method in DEQUANTIZED_ON_READ.get(parser, ()):
        return
    # Casting e.g. DeepSeek-V3's block-scaled fp8 weights without their scales would load garbage.
    raise UnsupportedModelError(
        f"{source} describes a pre-quantized checkpoint ({method}); dymoe reads bf16/fp16/fp32 weights "
        "(and GPT-OSS's mxfp4 experts) and makes its own low-bit copies: use the model's bf16 release "
        "(or dequantize it first)"
    )
