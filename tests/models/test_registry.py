"""config.json -> ModelConfig (dymoe/models/registry.py): Phi-MoE's keys and the cases it refuses."""

from __future__ import annotations

import pytest

from dymoe.errors import CheckpointError, UnsupportedModelError
from dymoe.models.registry import parse_config

# Spelled as the hub's microsoft/Phi-3.5-MoE-instruct config.json (transformers-4 keys, its own
# architecture name), at toy widths and with made-up factor lists (head_dim 16: 8 rotated pairs).
SHORT = [1.0, 1.0, 1.01, 1.02, 1.05, 1.1, 1.2, 1.3]
LONG = [1.0, 1.1, 1.3, 1.8, 2.5, 4.0, 6.0, 9.0]
PHI_HUB = {
    "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "vocab_size": 320, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_local_experts": 16, "num_experts_per_tok": 2, "router_jitter_noise": 0.01, "input_jitter_noise": 0.01,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "sliding_window": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": True, "lm_head_bias": True,
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000,
    "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG, "short_mscale": 1.243163121016122,
                     "long_mscale": 1.243163121016122, "original_max_position_embeddings": 4096},
}


def test_phimoe_hub_config():
    c = parse_config(PHI_HUB)
    assert (c.family, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.moe_layers) == (
        "phimoe", 16, 2, 96, (0, 1, 2))
    assert (c.topk_method, c.router_jitter_eps, c.norm_topk_prob) == ("sparsemixer", 0.01, False)
    assert (c.norm, c.rms_norm_eps, c.lm_head_bias) == ("layer", 1e-5, True)
    assert c.attention_bias and c.o_proj_bias
    assert (c.head_dim, c.max_position_embeddings, c.eos_token_ids) == (16, 131072, (32000,))
    r = c.rope
    assert (r.rope_type, r.theta, r.original_max_position, r.short_factor, r.long_factor) == (
        "longrope", 10000.0, 4096, tuple(SHORT), tuple(LONG))
    assert r.short_mscale == r.long_mscale == 1.243163121016122


def test_phimoe_transformers5_spelling_and_defaults():
    """transformers 5 writes rope_parameters and PhimoeForCausalLM; absent keys take PhimoeConfig's defaults."""
    raw = {k: v for k, v in PHI_HUB.items() if k not in ("rope_scaling", "rope_theta", "router_jitter_noise",
                                                        "rms_norm_eps", "lm_head_bias", "attention_bias")}
    raw.update(architectures=["PhimoeForCausalLM"], rope_parameters={"rope_type": "default"})
    c = parse_config(raw)
    assert (c.rope.rope_type, c.rope.theta, c.router_jitter_eps, c.rms_norm_eps) == ("default", 1e6, 0.01, 1e-5)
    assert not (c.attention_bias or c.o_proj_bias or c.lm_head_bias)
    assert parse_config({**raw, "architectures": [], "model_type": "phimoe"}).family == "phimoe"


def test_phimoe_context_ends_at_the_sliding_window():
    assert parse_config({**PHI_HUB, "sliding_window": 8192}).max_position_embeddings == 8192
    assert parse_config({**PHI_HUB, "sliding_window": None}).max_position_embeddings == 131072


@pytest.mark.parametrize(
    "change,error,message",
    [
        ({"num_experts_per_tok": 4}, UnsupportedModelError, "exactly 2 experts"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, UnsupportedModelError, "rope type 'yarn'"),
        ({"rope_scaling": {**PHI_HUB["rope_scaling"], "long_factor": LONG[:6]}}, CheckpointError,
         "long_factor has 6 values, expected 8"),
        ({"rope_scaling": {k: v for k, v in PHI_HUB["rope_scaling"].items() if k != "short_mscale"}},
         CheckpointError, "short_mscale"),
        ({"rope_scaling": {k: v for k, v in PHI_HUB["rope_scaling"].items() if k != "short_factor"}},
         CheckpointError, "short_factor"),
    ],
    ids=["top-4", "yarn", "factor-count", "no-mscale", "no-short-factor"],
)
def test_phimoe_refusals_name_the_cause(change, error, message):
    with pytest.raises(error, match=message):
        parse_config({**PHI_HUB, **change})
