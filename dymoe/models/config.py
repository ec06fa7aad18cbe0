"""ModelConfig: the one description of a model that every layer of dymoe reads.

It is parsed from a Hugging Face ``config.json`` by :mod:`dymoe.models.registry`; families differ only
in the few fields below (q/k norms, attention bias, router normalisation and grouping, shared
experts, DeepSeek's latent attention, GPT-OSS's sinks, sliding windows and biased experts). Both the
transformers-4 spelling (``rope_theta`` + ``rope_scaling``) and the transformers-5 spelling
(``rope_parameters``) of RoPE settings are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; ``rope_type`` is one of default, linear, dynamic, yarn, llama3, longrope."""

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
    # longrope (Phi-3.5): one frequency divisor per rotated pair, the short set while the sequence
    # fits original_max_position and the long set beyond; each set's cos/sin scale (None: derived
    # from factor as transformers does)
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    short_mscale: float | None = None
    long_mscale: float | None = None


@dataclass(frozen=True)
class LatentAttentionConfig:
    """Widths of DeepSeek's Multi-head Latent Attention (MLA, arXiv 2405.04434 section 2.1).

    Keys and values are projected down to one ``kv_lora_rank`` latent per token and up again per
    head; only ``qk_rope_head_dim`` of each query/key head carries RoPE, and that part of the key is
    shared by all heads. ``q_lora_rank`` None (DeepSeek-V2-Lite) projects queries directly.
    """

    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True  # RoPE pairs are adjacent dims (x0, x1), not (x0, x_{d/2})


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and family switches of a decoder-only MoE transformer."""

    # "qwen3_moe" | "qwen2_moe" | "mixtral" | "olmoe" | "deepseek_v2" | "deepseek_v3" | "phimoe" | "gpt_oss"
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # query/key head width (MLA: qk_nope_head_dim + qk_rope_head_dim)
    intermediate_size: int  # dense MLP width (layers that are not MoE)
    moe_intermediate_size: int  # one routed expert's width
    num_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    norm_topk_prob: bool = True
    attention_bias: bool = False  # q/k/v projections
    o_proj_bias: bool = False  # the attention output projection
    norm: str = "rms"  # block and final norms: "rms" (RMSNorm) | "layer" (LayerNorm with bias, Phi-MoE)
    lm_head_bias: bool = False
    qk_norm: str | None = None  # None | "per_head" (Qwen3) | "full" (OLMoE)
    clip_qkv: float | None = None
    shared_expert_intermediate_size: int = 0  # always-on shared expert(s), summed into one MLP
    shared_expert_gate: bool = False  # Qwen2-MoE scales it by a sigmoid gate; DeepSeek does not
    # Router variants beyond "softmax, top-k": DeepSeek-V3 scores with a sigmoid and picks with a
    # per-expert correction bias ("noaux_tc"); DeepSeek-V2 may first keep the topk_group best of
    # n_group expert groups ("group_limited_greedy"); both scale the chosen weights. Phi-MoE picks
    # two experts one after the other, each weighted by a softmax over the experts whose logits are
    # within router_jitter_eps of it ("sparsemixer").
    router_scoring: str = "softmax"  # "softmax" | "sigmoid"
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc" | "sparsemixer"
    router_jitter_eps: float = 0.0  # sparsemixer's relative logit margin (Phi-MoE's router_jitter_noise)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    latent_attention: LatentAttentionConfig | None = None  # DeepSeek's MLA instead of GQA
    # GPT-OSS: a learned per-head logit that joins each softmax's denominator only (an attention
    # "sink"), a sliding window on some layers (a key is seen by the sliding_window queries from its
    # own position on), and a router with a bias.
    attention_sinks: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # layer indices that use the sliding window
    router_bias: bool = False
    # How a routed expert turns its projections into an output: "silu" is SwiGLU,
    # down(silu(gate x) * up x); "gpt_oss" clamps gate (above) and up (both sides) at swiglu_limit and
    # computes down((up + 1) * gate * sigmoid(swiglu_alpha * gate)). expert_bias: every projection
    # has a bias (dymoe/models/expert_math.py is the one place that computes either).
    expert_activation: str = "silu"  # "silu" | "gpt_oss"
    expert_bias: bool = False
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    moe_layers: tuple[int, ...] = ()  # layer indices whose MLP is a routed MoE block
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections, and their biases)."""
        h, i = self.hidden_size, self.moe_intermediate_size
        return 3 * h * i + (2 * i + h if self.expert_bias else 0)

    @property
    def v_head_dim(self) -> int:
        """Width of one value head (MLA's differs from the query/key width)."""
        return self.latent_attention.v_head_dim if self.latent_attention else self.head_dim

    @property
    def rope_dim(self) -> int:
        """How many dims of a query/key head RoPE rotates (MLA: only the rope part)."""
        return self.latent_attention.qk_rope_head_dim if self.latent_attention else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def attention_window(self, layer: int) -> int | None:
        """How many positions (its own included) a query of ``layer`` sees; None: all before it."""
        return self.sliding_window if layer in self.sliding_layers else None
