"""DeepSeek's Multi-head Latent Attention (MLA, arXiv 2405.04434 section 2.1), as transformers 5 runs it.

Each token's keys and values are compressed into one ``kv_lora_rank`` latent (normalised) and
expanded per head by ``kv_b_proj``; queries go through their own low-rank pair (``q_a_proj``,
``q_a_layernorm``, ``q_b_proj``) or, when ``q_lora_rank`` is null (DeepSeek-V2-Lite), one ``q_proj``.
Only the last ``qk_rope_head_dim`` dims of a query/key head are rotated, and that part of the key
is one head shared by all. Module names match the checkpoints (``self_attn.kv_a_proj_with_mqa``...).

The KV cache holds the expanded per-head keys and values, so MLA shares the cache and the attention
kernel call of every other family. Caching the latent and the rope key instead (kv_lora_rank +
qk_rope_head_dim values per token and layer, 576 for DeepSeek-V2-Lite against 16 heads x (192 + 128)
= 5120 here) would cut the cache about 9x, at the cost of a per-step expansion or an absorbed-weight
attention kernel; the experts, not the cache, dominate memory at the context lengths dymoe targets.
"""

from __future__ import annotations

import math

import torch

from dymoe.models.config import ModelConfig, RopeConfig
from dymoe.models.layers import FusedProjections, KVCache, Linear, RMSNorm, RotaryEmbedding, _attend

# transformers builds the two latent norms without the config's rms_norm_eps (DeepseekV2RMSNorm's
# default), as DeepSeek's own modelling code does.
LATENT_NORM_EPS = 1e-6


def softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(query/key head width), times YaRN's mscale squared when the config gives mscale_all_dim
    (DeepSeek-V2: the logits of a long-context model are sharpened as its RoPE is stretched)."""
    scale = config.head_dim**-0.5
    rope: RopeConfig = config.rope
    if rope.rope_type != "default" and rope.mscale_all_dim:
        m = 1.0 if rope.factor <= 1 else 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
        scale *= m * m
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek rotates adjacent pairs; after this
    permutation the shared rotate-half RoPE rotates the same pairs. Queries and keys are permuted
    alike, so their dot products are unchanged."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class LatentAttention(FusedProjections):
    """MLA: low-rank queries and key-values, RoPE on a decoupled part of each head."""

    supports_static_position = True  # rotary, cache and _attend take a device-held position (CUDA graphs)

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        m = config.latent_attention
        self.layer = layer
        self.num_heads = config.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.kv_lora_rank = m.kv_lora_rank
        self.interleaved = m.rope_interleave
        hidden, heads, qk_dim = config.hidden_size, config.num_heads, config.head_dim
        if m.q_lora_rank is None:
            self.q_proj = Linear(hidden, heads * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden, m.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(m.q_lora_rank, heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, m.kv_lora_rank + m.qk_rope_head_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = Linear(heads * m.v_head_dim, hidden, bias=config.attention_bias)
        self.low_rank_q = m.q_lora_rank is not None
        self.scale = softmax_scale(config)

    def forward(self, x: torch.Tensor, start, cache: KVCache, rotary: RotaryEmbedding) -> torch.Tensor:
        b, t, _ = x.shape
        first = self.q_a_proj if self.low_rank_q else self.q_proj
        q, kv_a = self._project(x, "q_kv_a", (first, self.kv_a_proj_with_mqa))  # both read x
        q_nope, q_rope = self._queries(x, q).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, t, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = k_rope.view(b, 1, t, self.rope_dim)
        if self.interleaved:
            q_rope, k_rope = deinterleave(q_rope), deinterleave(k_rope)
        q_rope, k_rope = rotary(q_rope, k_rope, start)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(b, self.num_heads, t, self.rope_dim)], dim=-1)
        k, v = cache.update(self.layer, start, k, v)
        out = _attend(q, k, v, start, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _queries(self, x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Queries [B, H, T, nope + rope] from x [B, T, hidden], given ``first``, x through q_a_proj
        (low-rank queries) or q_proj."""
        q = self.q_b_proj(self.q_a_layernorm(first)) if self.low_rank_q else first
        return q.reshape(*x.shape[:2], self.num_heads, -1).transpose(1, 2)
