"""The pieces every family shares, written once: RMSNorm (or LayerNorm), rotary embeddings, attention
with a preallocated KV cache, and the dense SwiGLU MLP.

Numerics follow Hugging Face transformers (norms in float32, RoPE tables in float32 cast to the
activation dtype) so that logits match it within float tolerance (invariant 1 of DESIGN.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dymoe.models.config import ModelConfig, RopeConfig
from dymoe.models.fused import (add_rms_norm, add_rms_norm_applies, decode_attend, decode_attention_applies,
                                fused_applies, linear_decode, linear_decode_applies, qkv_decode, qkv_decode_applies,
                                rms_norm, rotary, rotary_applies)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_applies(x):  # one kernel instead of eight (dymoe/models/fused.py)
            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def add_norm(x: torch.Tensor, y: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(``x + y``, ``norm`` of it): a residual add and the next block's norm, one launch where the
    fused kernels run an RMSNorm (:func:`~dymoe.models.fused.add_rms_norm`); (x, its norm) when
    ``y`` is None (nothing to add)."""
    if y is None:
        return x, norm(x)
    if isinstance(norm, RMSNorm) and add_rms_norm_applies(x, y, norm.weight):
        return add_rms_norm(x, y, norm.weight, norm.eps)
    h = x + y
    return h, norm(h)


def block_norm(config: ModelConfig) -> nn.Module:
    """The norm before each block and before the LM head: RMSNorm, or LayerNorm with a bias (Phi-MoE)."""
    if config.norm == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---- rotary embeddings ---------------------------------------------------------------------------


def rope_inv_freq(rope: RopeConfig, head_dim: int, context_len: int, long: bool = False
                  ) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling for one RoPE variant (YaRN, Llama-3, ...);
    ``long`` picks LongRoPE's set for sequences longer than ``original_max_position``."""
    dim = int(head_dim * rope.partial_rotary_factor)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = rope.theta
    if rope.rope_type == "dynamic" and rope.original_max_position and context_len > rope.original_max_position:
        # NTK-aware scaling, fixed for the whole allocated context so the KV cache stays consistent.
        ratio = rope.factor * context_len / rope.original_max_position - (rope.factor - 1)
        base = base * ratio ** (dim / (dim - 2))
    if rope.rope_type == "longrope":
        return _longrope_inv_freq(rope, base**exponents, long)
    inv_freq = 1.0 / (base**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope), 1.0
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, dim)
    return inv_freq, 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old_len = rope.original_max_position
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _longrope_inv_freq(rope: RopeConfig, wavelengths: torch.Tensor, long: bool) -> tuple[torch.Tensor, float]:
    """LongRoPE (arXiv 2402.13753): each rotated pair's frequency divided by its own factor; the
    scale is the config's mscale of that set, else sqrt(1 + ln(factor) / ln(original length))."""
    factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
    scale = rope.long_mscale if long else rope.short_mscale
    if scale is None:
        scale = rope.attention_factor
    if scale is None:
        stretch = math.log(rope.factor) / math.log(rope.original_max_position)
        scale = 1.0 if rope.factor <= 1.0 else math.sqrt(1 + stretch)
    return 1.0 / (factors * wavelengths), float(scale)


def longrope_switch(rope: RopeConfig, context_len: int) -> int | None:
    """The sequence length past which LongRoPE's long set replaces the short one, if a context of
    ``context_len`` can get there and the two sets differ; else None (one table serves every length)."""
    if rope.rope_type != "longrope" or context_len <= rope.original_max_position:
        return None
    same = rope.short_factor == rope.long_factor and rope.short_mscale == rope.long_mscale
    return None if same else rope.original_max_position


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, ramp in between."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = rope.factor
    if rope.attention_factor is not None:
        attention = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


@dataclass(frozen=True)
class StaticPosition:
    """One decode token's position held on the device, so a CUDA graph replays at any position.

    ``index`` [1] int64 is the position; attention covers the first ``span`` cache entries (fixed
    per graph) and ``mask`` [1, span] bool (``arange(span) <= index``) hides those not yet written.
    """

    index: torch.Tensor
    span: int
    mask: torch.Tensor


Position = int | StaticPosition


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, context_len), built once at start-up.

    LongRoPE rotates every position of a sequence with one set of frequencies, chosen by the
    sequence's length: the short set up to ``switch`` tokens, the long set beyond. ``cos``/``sin``
    row p holds what the last token of a p+1-token sequence uses (short below ``switch``, long from
    it on), which is all a decode step needs; ``cos_long``/``sin_long`` hold the long set at every
    position, for a call whose tokens span the switch (see MoETransformer.forward).
    """

    def __init__(self, rope: RopeConfig, head_dim: int, context_len: int):
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.context_len = context_len
        self.switch = longrope_switch(rope, context_len)
        for name in ("cos", "sin", "cos_long", "sin_long"):
            self.register_buffer(name, torch.empty(0), persistent=False)

    def build(self, device: torch.device | str, dtype: torch.dtype) -> None:
        cos, sin = self._table(long=False)
        if self.switch is not None:
            cos_long, sin_long = self._table(long=True)
            cos[self.switch :], sin[self.switch :] = cos_long[self.switch :], sin_long[self.switch :]
            self.cos_long = cos_long.to(device=device, dtype=dtype)
            self.sin_long = sin_long.to(device=device, dtype=dtype)
        self.cos, self.sin = cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)

    def _table(self, long: bool) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = rope_inv_freq(self.rope, self.head_dim, self.context_len, long)
        positions = torch.arange(self.context_len, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * scale, emb.sin() * scale

    def crosses_switch(self, length: int, new_length: int) -> bool:
        """Whether a sequence growing from ``length`` to ``new_length`` tokens passes LongRoPE's switch
        (from the short set to the long one)."""
        return self.switch is not None and length <= self.switch < new_length

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: Position) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q, k of shape [B, heads, T, D] for positions start..start+T-1."""
        static = isinstance(start, StaticPosition)
        t = q.shape[2]
        long = not static and self.crosses_switch(start, start + t)
        cos, sin = (self.cos_long, self.sin_long) if long else (self.cos, self.sin)
        if rotary_applies(q, cos) and rotary_applies(k, cos):  # two kernels instead of ten
            where = dict(positions=start.index) if static else dict(start=start)
            return rotary(q, cos, sin, **where), rotary(k, cos, sin, **where)
        if static:
            cos, sin = cos.index_select(0, start.index), sin.index_select(0, start.index)
        else:
            cos, sin = cos[start : start + t], sin[start : start + t]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---- attention -----------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer, preallocated for ``batch`` x ``context_len`` at start-up;
    with ``keep_tokens``, also the token ids they came from (a LongRoPE model re-runs them when its
    sequence outgrows the short frequencies)."""

    def __init__(self, config: ModelConfig, batch: int, context_len: int, device, dtype: torch.dtype,
                 keep_tokens: bool = False):
        shape = (config.num_layers, batch, config.num_kv_heads, context_len)
        self.k = torch.zeros(*shape, config.head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(*shape, config.v_head_dim, device=device, dtype=dtype)
        self.tokens = torch.zeros(batch, context_len, dtype=torch.long, device=device) if keep_tokens else None
        self.context_len = context_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, layer: int, start: Position, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at ``start`` and return the filled prefix [.., :start+T, ..]
        (for a :class:`StaticPosition`, the first ``span`` entries)."""
        if isinstance(start, StaticPosition):
            self.k[layer].index_copy_(2, start.index, k)
            self.v[layer].index_copy_(2, start.index, v)
            return self.k[layer, :, :, : start.span], self.v[layer, :, :, : start.span]
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# cuDNN's attention is left out: it builds an execution plan for every new key length, which on an
# H100 cost ~5.7 ms of host time per call in decode (each step has a new length; measured with
# benchmarks/profile_decode.py) against a few microseconds for the flash and efficient kernels.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or for a decode token on the GPU :func:`~dymoe.models.fused.linear_decode`
    (where :func:`~dymoe.models.fused.linear_decode_applies`)."""
    if linear_decode_applies(x, weight, bias):
        return linear_decode(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose decode token runs through :func:`linear` (a layer's dense projections;
    the LM head, at copy speed in cuBLAS already, stays an ``nn.Linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class FusedProjections(nn.Module):
    """A module some of whose linear layers read the same input (q, k and v; gate and up): on CUDA,
    where a one-token step is bound by launches, :meth:`_project` runs them as one GEMM (three
    launches -> one for q, k and v: ~12 us a Qwen3 layer on an H100). The fused weight is made on
    first use and the layers' weights become views of it, so it costs no memory; a move or cast
    of the module (``_apply``) drops it, and the next use fuses again."""

    def __init__(self):
        super().__init__()
        self._fused: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _apply(self, fn, *args, **kwargs):
        self._fused = {}  # the parameters are replaced: drop the old memory
        return super()._apply(fn, *args, **kwargs)

    def _project(self, x: torch.Tensor, name: str, projs: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
        """Each of ``projs`` applied to x, through one GEMM where :func:`fuse_projections` says so."""
        fused = self._fused_weights(name, projs) if fuse_projections(x) else None
        if fused is None:
            return tuple(p(x) for p in projs)
        return linear(x, *fused).split([p.weight.shape[0] for p in projs], -1)

    def _fused_weights(self, name: str, projs: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``projs``' weights (and biases) as one [rows of all, in] tensor, the layers' own weights
        views of it; None while a CUDA graph is being captured (no allocation there) or where the
        layers differ in dtype, device or having a bias."""
        fused = self._fused.get(name)
        if fused is not None and all(_views_of(p.weight, fused[0]) for p in projs):
            return fused
        weights = [p.weight for p in projs]
        if (len({(w.dtype, w.device) for w in weights}) > 1 or len({p.bias is None for p in projs}) > 1
                or (weights[0].is_cuda and torch.cuda.is_current_stream_capturing())):
            return None
        with torch.no_grad():
            weight = torch.cat([w.data for w in weights])
            bias = torch.cat([p.bias.data for p in projs]) if projs[0].bias is not None else None
            rows = [w.shape[0] for w in weights]
            for p, part in zip(projs, weight.split(rows)):
                p.weight.data = part
            for p, part in zip(projs, bias.split(rows) if bias is not None else ()):
                p.bias.data = part
        self._fused[name] = (weight, bias)
        return self._fused[name]


def fuse_projections(x: torch.Tensor) -> bool:
    """Whether :class:`FusedProjections` runs linear layers that share an input as one GEMM: on
    CUDA. On the CPU separate GEMMs cost no more, and the logits stay as the tests compare them
    with transformers' (a test forces the fused path there too)."""
    return x.is_cuda


def _views_of(param: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``param`` still lies inside ``base`` (not replaced by a move or a cast)."""
    start = param.data_ptr() - base.data_ptr()
    return param.dtype == base.dtype and param.device == base.device and 0 <= start < base.numel() * base.element_size()


class Attention(FusedProjections):
    """Grouped-query attention with the q/k-norm and bias variants of the supported families, and
    GPT-OSS's attention sinks and sliding windows (:func:`attend_with_sinks`)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_proj_bias)
        self.sinks = nn.Parameter(torch.zeros(c.num_heads)) if c.attention_sinks else None
        self.window = c.attention_window(layer)
        self.qk_norm = c.qk_norm
        if c.qk_norm == "per_head":
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(c.num_heads * c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim, c.rms_norm_eps)
        self.clip_qkv = c.clip_qkv

    supports_static_position = True  # decode runs in CUDA graphs (dymoe/models/decode_graphs.py)

    def forward(self, x: torch.Tensor, start: Position, cache: KVCache, rotary: RotaryEmbedding) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._project(x, "qkv", (self.q_proj, self.k_proj, self.v_proj))
        decoded = self._decode_inputs(q, k, v, start, cache, rotary) if isinstance(start, StaticPosition) else None
        if decoded is not None:
            q, k, v = decoded
        else:
            q, k, v = self._inputs(q, k, v, start, cache, rotary)
        if self.sinks is None and self.window is None:
            out = _attend(q, k, v, start)
        else:
            out = attend_with_sinks(q, k, v, start, self.sinks, self.window)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _decode_inputs(self, q, k, v, start: StaticPosition, cache: KVCache, rotary: RotaryEmbedding):
        """The graph decode's token: q/k norms, rotary and the cache writes in one kernel
        (:func:`~dymoe.models.fused.qkv_decode`) where it applies, else None. What the kernel
        leaves out (norms over all heads, clipping) takes the general path."""
        if self.qk_norm == "full" or self.clip_qkv is not None:
            return None
        norms = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm == "per_head" else None
        cache_k, cache_v = cache.k[self.layer], cache.v[self.layer]
        if not qkv_decode_applies(q, k, v, cache_k, cache_v, rotary.cos, norms):
            return None
        q = qkv_decode(q, k, v, cache_k, cache_v, rotary.cos, rotary.sin, start.index, norms,
                       self.q_norm.eps if norms is not None else 0.0)
        return q, cache_k[:, :, : start.span], cache_v[:, :, : start.span]

    def _inputs(self, q, k, v, start: Position, cache: KVCache, rotary: RotaryEmbedding):
        """q [B, H, T, D] normed and rotated, and the cache's filled keys and values once k and v
        are written."""
        b, t, _ = q.shape
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q.transpose(1, 2), k.transpose(1, 2), start)
        k, v = cache.update(self.layer, start, k, v)
        return q, k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: Position, scale: float | None = None
            ) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] over k, v [B, Hkv, L, D] (grouped-query when H > Hkv);
    scores are scaled by ``scale`` (default 1/sqrt(D)).

    One new token sees every cached key, so its query heads can be folded into the query length of
    their key-value head ([B, Hkv, H/Hkv, D]): a plain attention the flash and efficient kernels run,
    with no key-value copy. Several tokens need the causal mask, so they use SDPA's own GQA support.
    In the graph decode (a :class:`StaticPosition`) one token on a GPU takes the split kernel
    (:mod:`dymoe.models.decode_attention`; ``DYMOE_DECODE_ATTENTION=sdpa``: SDPA's masked one).
    """
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    mask = start.mask if isinstance(start, StaticPosition) else None
    if t == 1 and mask is not None and decode_attention_applies(q):  # the graph decode's masked span
        return decode_attend(q, k, v, start.index, d**-0.5 if scale is None else scale)
    with sdpa_kernel(SDPA_BACKENDS):
        if t == 1 and groups > 1:
            out = F.scaled_dot_product_attention(q.view(b, k.shape[1], groups, d), k, v, attn_mask=mask,
                                                 scale=scale)
            return out.reshape(b, h, 1, -1)  # the masked (graph) path may return a strided output
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=_causal_mask(start, t, q.device), is_causal=(start == 0 and t > 1),
            enable_gqa=groups > 1, scale=scale,
        )


# Scores of at most this many bytes (float32) are held at once by attend_with_sinks: a long prompt
# runs in chunks of queries (GPT-OSS-20B: 64 heads x 2048 keys x 128 queries = 64 MiB).
SCORE_BYTES = 64 * 2**20


def attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: Position,
                      sinks: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] over the cached k, v [B, Hkv, L, D], where each query
    sees only the ``window`` latest positions (its own included) when a window is given, and each
    head's softmax has one more term in its denominator, exp(sinks[h]), that weighs no value
    (GPT-OSS's attention sinks). Written out, as transformers' eager GPT-OSS attention is (SDPA has
    no sink term); the softmax runs in float32.

    With an int ``start`` the keys before the first query's window are not read at all, so a
    sliding layer decodes over ``window`` keys whatever the context; a :class:`StaticPosition`
    (CUDA-graph decode) takes the split kernel on a GPU, which starts at the window too
    (:mod:`dymoe.models.decode_attention`), and elsewhere masks them.
    """
    t = q.shape[2]
    if isinstance(start, StaticPosition):
        if t == 1 and decode_attention_applies(q):  # the split kernel, as _attend's
            return decode_attend(q, k, v, start.index, q.shape[3] ** -0.5, sinks, window)
        return _sink_softmax_attend(q, k, v, _static_visible(start, window), sinks)
    first = max(0, start - window + 1) if window is not None else 0
    k, v = k[:, :, first:], v[:, :, first:]
    chunk = max(1, SCORE_BYTES // (4 * q.shape[0] * q.shape[1] * k.shape[2]))
    outs = []
    for lo in range(0, t, chunk):
        hi = min(t, lo + chunk)
        visible = _visible(start + lo, hi - lo, first, k.shape[2], window, q.device)
        outs.append(_sink_softmax_attend(q[:, :, lo:hi], k, v, visible, sinks))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _visible(start: int, t: int, first: int, keys: int, window: int | None, device) -> torch.Tensor:
    """[t, keys] bool: whether query start+i sees key first+j (causal, within the window)."""
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(first, first + keys, device=device)[None, :]
    visible = k_pos <= q_pos
    return visible if window is None else visible & (k_pos > q_pos - window)


def _static_visible(start: StaticPosition, window: int | None) -> torch.Tensor:
    if window is None:
        return start.mask
    k_pos = torch.arange(start.span, device=start.mask.device)
    return start.mask & (k_pos > start.index - window)


def _sink_softmax_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                         sinks: torch.Tensor | None) -> torch.Tensor:
    b, h, t, d = q.shape
    hkv, keys = k.shape[1], k.shape[2]
    # the query heads of one key-value head attend together: [B, Hkv, (H/Hkv)*T, D] against [B, Hkv, L, D]
    scores = torch.matmul(q.reshape(b, hkv, -1, d), k.transpose(2, 3)).view(b, h, t, keys).float()
    scores = scores.mul_(d**-0.5).masked_fill_(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.float().view(1, h, 1, 1).expand(b, h, t, 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1)[..., :keys].to(v.dtype)
    return torch.matmul(probs.reshape(b, hkv, -1, keys), v).view(b, h, t, -1)


def _causal_mask(start: Position, t: int, device) -> torch.Tensor | None:
    """None when SDPA's own masking suffices (prefill from 0, or one new token); else a bool mask."""
    if isinstance(start, StaticPosition):
        return start.mask
    if start == 0 or t == 1:
        return None
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(start + t, device=device)[None, :]
    return k_pos <= q_pos


class DenseMLP(FusedProjections):
    """SwiGLU MLP: dense layers, and Qwen2-MoE's shared expert."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = Linear(hidden, width, bias=False)
        self.up_proj = Linear(hidden, width, bias=False)
        self.down_proj = Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._project(x, "gate_up", (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)
