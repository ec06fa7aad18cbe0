"""Synthetic real-shape models: the architecture of a published MoE checkpoint, random weights, no disk.

Performance work needs the real shapes (expert bytes, head sizes, vocabulary) far more than trained
weights, and a 60 GB download is a poor start for a benchmark. A synthetic model is the config.json
of a hub checkpoint run through the same parser as a real one (:func:`dymoe.models.registry.parse_config`),
with every weight drawn from a seeded normal distribution straight into the memory it will live in.

The shapes are copied from the public ``config.json`` files of these hub repositories:

* ``qwen3-30b-a3b``: Qwen/Qwen3-30B-A3B (hidden 2048, 48 layers, 32 query / 4 KV heads of 128,
  128 experts, top-8, moe_intermediate_size 768, vocab 151936, norm_topk_prob true, RoPE theta 1e6).
* ``mixtral-8x7b``: mistralai/Mixtral-8x7B-v0.1 (hidden 4096, 32 layers, 32 / 8 heads, 8 experts,
  top-2, intermediate_size 14336, vocab 32000, RoPE theta 1e6).
* ``olmoe-1b-7b``: allenai/OLMoE-1B-7B-0924 (hidden 2048, 16 layers, 16 / 16 heads, 64 experts,
  top-8, intermediate_size 1024, vocab 50304, q/k norm over the full projection).
* ``qwen2-moe-a2.7b``: Qwen/Qwen1.5-MoE-A2.7B (hidden 2048, 24 layers, 16 / 16 heads, 60 experts,
  top-4, moe_intermediate_size 1408, shared expert 5632, vocab 151936, q/k/v bias).
* ``deepseek-v2-lite``: deepseek-ai/DeepSeek-V2-Lite (hidden 2048, 27 layers of which the first is
  dense with intermediate_size 10944, 16 heads of multi-head latent attention with kv_lora_rank 512,
  q_lora_rank null, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128; 64 routed experts,
  top-6, greedy softmax routing, norm_topk_prob false, routed_scaling_factor 1.0, 2 shared experts,
  moe_intermediate_size 1408, vocab 102400, YaRN RoPE theta 1e4 factor 40 from 4096 positions with
  mscale = mscale_all_dim = 0.707, max_position_embeddings 163840).
* ``phi-3.5-moe``: microsoft/Phi-3.5-MoE-instruct (hidden 4096, 32 layers, 32 / 8 heads of 128,
  16 experts, top-2 sparsemixer routing with router_jitter_noise 0.01, intermediate_size 6400,
  vocab 32064, LayerNorms with eps 1e-5, q/k/v/o and LM-head biases, RoPE theta 1e4,
  max_position_embeddings 131072; the shapes are also transformers' PhimoeConfig defaults,
  models/phimoe/configuration_phimoe.py). Its LongRoPE scaling (two lists of 64 factors, switching
  at 4096 positions) is left out: the synthetic model runs plain RoPE, which costs the same.
* ``gpt-oss-20b``: openai/gpt-oss-20b (hidden 2880, 24 layers alternating sliding-window (128
  positions, from layer 0) and full attention, 64 query / 8 KV heads of 64 with attention sinks and
  q/k/v/o biases, 32 experts, top-4, intermediate_size 2880 with biases and the clamped SwiGLU
  (swiglu_limit 7.0), vocab 201088, RMSNorm eps 1e-5, YaRN RoPE theta 150000 factor 32 from 4096
  positions without truncation, max_position_embeddings 131072). Apart from the depth and the
  expert count (the 120b's 36 and 128) these are transformers' GptOssConfig defaults
  (models/gpt_oss/configuration_gpt_oss.py). The release's experts are MXFP4; here they are drawn
  in bf16 like every synthetic model's.

Weights are a function of (seed, tensor name, device kind) only: each tensor has its own generator,
so layer 3 of a 4-layer model equals layer 3 of the 48-layer one, and the same seed gives the same
model on every run (CPU and CUDA generators differ, so a CPU-built and a GPU-built model do not).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable

import torch

from dymoe.bench.routing import SyntheticRouting, apply_routing
from dymoe.errors import InputError
from dymoe.models.config import ModelConfig
from dymoe.models.registry import parse_config
from dymoe.models.transformer import MoETransformer

SPEC_PREFIX = "synthetic:"
DEFAULT_STD = 0.02  # the initializer_range of all four families' configs

# Keys as the hub's config.json files spell them (only those parse_config reads).
SYNTHETIC_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 50304,
        "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
        "clip_qkv": None, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": 50279,
    },
    "qwen2-moe-a2.7b": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False,
        "qkv_bias": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "scoring_func": "softmax",
        "routed_scaling_factor": 1.0, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                              "mscale_all_dim": 0.707},
        "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001,
    },
    "phi-3.5-moe": {
        "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "vocab_size": 32064,
        "hidden_size": 4096, "intermediate_size": 6400, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 16, "num_experts_per_tok": 2, "router_jitter_noise": 0.01,
        "max_position_embeddings": 131072, "sliding_window": 131072, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "attention_bias": True, "lm_head_bias": True, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 32000,
    },
    "gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088,
        "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4,
        "experts_per_token": 4, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "attention_bias": True,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 150000,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 4096},
        "swiglu_limit": 7.0, "tie_word_embeddings": False, "eos_token_id": 200002, "pad_token_id": 199999,
    },
}

# Fills one MoE layer's router weight [E, H] in place. Skewed, local routing does not come from the
# weights (random ones route near uniformly whatever their scale) but from dymoe.bench.routing.
RouterInit = Callable[[int, torch.Tensor, torch.Generator], None]


def parse_model_spec(spec: str) -> str | None:
    """``"synthetic:NAME"`` -> NAME (checked against SYNTHETIC_SHAPES); any other spec (a path) -> None."""
    if not spec.startswith(SPEC_PREFIX):
        return None
    name = spec[len(SPEC_PREFIX):]
    if name not in SYNTHETIC_SHAPES:
        raise InputError(
            f"unknown synthetic model {name!r} in {spec!r}; choose one of: "
            + ", ".join(SPEC_PREFIX + n for n in SYNTHETIC_SHAPES)
        )
    return name


def synthetic_config(name: str, layers: int | None = None) -> ModelConfig:
    """The ModelConfig of a synthetic shape, optionally cut to its first ``layers`` layers."""
    if name not in SYNTHETIC_SHAPES:
        raise InputError(f"unknown synthetic model {name!r}; choose one of: {', '.join(SYNTHETIC_SHAPES)}")
    raw = dict(SYNTHETIC_SHAPES[name])
    if layers is not None:
        if not 1 <= layers <= raw["num_hidden_layers"]:
            raise InputError(f"{name} has {raw['num_hidden_layers']} layers; asked for {layers}")
        raw["num_hidden_layers"] = layers
        if "layer_types" in raw:  # GPT-OSS: one attention kind per layer
            raw["layer_types"] = raw["layer_types"][:layers]
    return parse_config(raw, source=SPEC_PREFIX + name)


def tiny_config(config: ModelConfig) -> ModelConfig:
    """The same family and switches at toy widths, for CPU smoke runs and tests.

    Keeps whether attention is grouped-query (or latent), whether there is a shared expert and the
    layer pattern; shrinks every width, the vocabulary and the expert count.
    """
    kv_heads = 4 if config.num_kv_heads == config.num_heads else 2
    latent = config.latent_attention
    if latent is not None:
        latent = dataclasses.replace(latent, kv_lora_rank=32, q_lora_rank=latent.q_lora_rank and 24,
                                     qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
    return dataclasses.replace(
        config,
        vocab_size=512,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=kv_heads,
        head_dim=16,
        intermediate_size=96 if config.intermediate_size else 0,
        moe_intermediate_size=32,
        num_experts=min(config.num_experts, 16),
        num_experts_per_tok=min(config.num_experts_per_tok, 4),
        shared_expert_intermediate_size=80 if config.shared_expert_intermediate_size else 0,
        max_position_embeddings=min(config.max_position_embeddings, 4096),
        latent_attention=latent,  # head_dim 16 = qk_nope_head_dim + qk_rope_head_dim
    )


def tensor_generator(seed: int, name: str, device: torch.device | str) -> torch.Generator:
    """A generator whose stream depends only on the seed and the tensor's name (not on build order)."""
    device = torch.device(device)
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def fill_normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        return tensor.normal_(0.0, std, generator=generator)


def build_dense(
    config: ModelConfig,
    device,
    dtype: torch.dtype,
    seed: int = 0,
    context_len: int = 4096,
    std: float = DEFAULT_STD,
    router_init: RouterInit | None = None,
    routing: SyntheticRouting | None = None,
) -> MoETransformer:
    """The model without its experts, built as :func:`~dymoe.models.transformer.load_dense` builds it.

    Norm weights are one, biases zero, every other weight normal(0, std); ``router_init`` replaces
    the routers' normal init; ``routing`` (skewed) replaces the routers' choice of experts with
    :mod:`dymoe.bench.routing`'s seeded process, tabled for the whole ``context_len``.
    """
    with torch.device("meta"):
        model = MoETransformer(config, context_len)
    model.to_empty(device=device).to(dtype=dtype)
    for name, param in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            elif router_init is not None and name.endswith("mlp.gate.weight"):
                router_init(_layer_of(name), param, tensor_generator(seed, name, param.device))
            else:
                fill_normal_(param, std, tensor_generator(seed, name, param.device))
    model.rotary.build(device, dtype)
    if routing is not None:
        apply_routing(model, routing, seed)
    model.requires_grad_(False)
    model.eval()
    return model


def build_expert_layer(
    config: ModelConfig,
    layer: int,
    device,
    dtype: torch.dtype,
    seed: int = 0,
    std: float = DEFAULT_STD,
    pin_memory: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One MoE layer's stacked experts: gate_up [E, 2I, H] and down [E, H, I], and for families with
    biased experts (GPT-OSS) their biases gate_up [E, 2I] and down [E, H], drawn in place.

    Drawn directly in ``dtype`` on ``device`` (pinned when asked), so the peak is the layer itself.
    """
    e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size
    prefix = f"model.layers.{layer}.mlp.experts."
    shapes = [("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))]
    if config.expert_bias:
        shapes += [("gate_up_proj_bias", (e, 2 * i)), ("down_proj_bias", (e, h))]
    stacks = []
    for name, shape in shapes:
        tensor = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin_memory and _is_cpu(device))
        stacks.append(fill_normal_(tensor, std, tensor_generator(seed, prefix + name, tensor.device)))
    return tuple(stacks)


def build_synthetic(
    config: ModelConfig,
    device,
    dtype: torch.dtype,
    seed: int = 0,
    context_len: int = 4096,
    expert_device=None,
    pin_memory: bool = False,
    std: float = DEFAULT_STD,
    router_init: RouterInit | None = None,
    routing: SyntheticRouting | None = None,
) -> tuple[MoETransformer, dict[int, tuple[torch.Tensor, ...]]]:
    """A random-weight model of ``config``: the dense model on ``device`` and expert stacks per MoE layer.

    Experts (stacks as :func:`build_expert_layer` draws them) go to ``expert_device`` (default
    ``device``), e.g. ``"cpu"`` with ``pin_memory=True`` for an offloading runtime, or the GPU for
    :class:`~dymoe.runtime.resident.ResidentExperts`. They are
    returned, not attached: the caller picks the runtime. Layers are drawn one at a time.
    """
    model = build_dense(config, device, dtype, seed, context_len, std, router_init, routing)
    expert_device = device if expert_device is None else expert_device
    experts = {
        layer: build_expert_layer(config, layer, expert_device, dtype, seed, std, pin_memory)
        for layer in config.moe_layers
    }
    return model, experts


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.N.…


def _is_cpu(device) -> bool:
    return torch.device(device).type == "cpu"
