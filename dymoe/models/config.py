"""ModelConfig: the one description of a model that every layer of dymoe reads.

It is parsed from a Hugging Face ``config.json`` by :mod:`dymoe.models.registry`; families differ only
in the few fields below (q/k norms, attention bias, router normalisation, shared expert). Both the
transformers-4 spelling (``rope_theta`` + ``rope_scaling``) and the transformers-5 spelling
(``rope_parameters``) of RoPE settings are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; ``rope_type`` is one of default, linear, dynamic, yarn, llama3."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and family switches of a decoder-only MoE transformer."""

    family: str  # "qwen3_moe" | "qwen2_moe" | "mixtral" | "olmoe"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (layers that are not MoE)
    moe_intermediate_size: int  # one routed expert's width
    num_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    norm_topk_prob: bool = True
    attention_bias: bool = False
    qk_norm: str | None = None  # None | "per_head" (Qwen3) | "full" (OLMoE)
    clip_qkv: float | None = None
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (with sigmoid gate)
    moe_layers: tuple[int, ...] = ()  # layer indices whose MLP is a routed MoE block
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers
