"""The decoder-only MoE transformer every supported family shares, and its checkpoint loader.

Module names mirror the Hugging Face checkpoints (``model.layers.N.self_attn.q_proj``...), so the
loader maps a parameter to its tensor by name; the only family-specific names are in
:func:`checkpoint_name`. Routed experts are not parameters of this model: the MoE blocks ask an
:class:`~dymoe.models.moe.ExpertProvider` for them.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from dymoe.models.config import ModelConfig
from dymoe.models.latent_attention import LatentAttention
from dymoe.models.layers import Attention, DenseMLP, KVCache, RotaryEmbedding, add_norm, block_norm
from dymoe.models.moe import ExpertProvider, MoEBlock, RoutingClock


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = (LatentAttention if config.latent_attention else Attention)(config, layer)
        self.input_layernorm = block_norm(config)
        self.post_attention_layernorm = block_norm(config)
        if config.is_moe_layer(layer):
            self.mlp = MoEBlock(config, layer)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, start, cache, rotary, pending=None):
        """The layer on the residual stream ``x + pending`` (``pending``: the layer before's MLP
        output, not yet added; None for the first): (the stream after attention, this layer's MLP
        output), whose sum is the stream after the layer. Each residual add runs with the norm after
        it (:func:`add_norm`: one launch on a GPU, with the roundings of the add and then the norm)."""
        x, normed = self.input_norm(x, pending)
        x, normed = add_norm(x, self.self_attn(normed, start, cache, rotary), self.post_attention_layernorm)
        return x, self.mlp(normed)

    def input_norm(self, x, pending):
        """(``x + pending``, its input norm); (x, its input norm) without ``pending``."""
        return add_norm(x, pending, self.input_layernorm)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = block_norm(config)


class MoETransformer(nn.Module):
    """Embeddings, decoder layers, final norm and LM head; experts come from ``self.experts``."""

    def __init__(self, config: ModelConfig, context_len: int):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.rotary = RotaryEmbedding(config.rope, config.rope_dim, context_len)
        self.context_len = context_len
        self.experts: ExpertProvider | None = None
        self.routing_clock: RoutingClock | None = None  # only for position-dependent (synthetic) routing
        self.cuda_graphs = True  # decode() replays CUDA graphs on a CUDA device (decode_graphs.py)
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KVCache -> DecodeGraphs

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoEBlock)]

    def attach_experts(self, experts: ExpertProvider) -> None:
        """Hand every MoE block the expert runtime; a runtime with ``bind`` gets the model too (the
        prefetcher reads the routers)."""
        self.experts = experts
        self._graphs = weakref.WeakKeyDictionary()  # recordings hold the previous runtime's calls
        for block in self.moe_blocks:
            block.experts = experts
        if hasattr(experts, "bind"):
            experts.bind(self)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 -> logits [B, T, V] (or [B, V] if last_only)."""
        new = tokens.shape[1]
        if cache.tokens is not None:
            tokens, start = self._with_history(tokens, start, cache)
        if self.routing_clock is not None:
            self.routing_clock.set(start, tokens.shape[1])
        x, pending = self.model.embed_tokens(tokens), None
        for layer in self.model.layers:
            x, pending = layer(x, start, cache, self.rotary, pending)
        if last_only:
            x, pending = x[:, -1], pending[:, -1]
        elif tokens.shape[1] != new:  # a re-run sequence: the logits of the new tokens only
            x, pending = x[:, -new:], pending[:, -new:]
        return self.lm_head(add_norm(x, pending, self.model.norm)[1]).float()

    def _with_history(self, tokens: torch.Tensor, start: int, cache: KVCache) -> tuple[torch.Tensor, int]:
        """Record ``tokens`` in the cache. If they take the sequence past LongRoPE's switch while the
        cache holds keys rotated for a shorter sequence, return the whole sequence from position 0
        instead, to run it again with the long frequencies: every position of a LongRoPE sequence
        uses its length's set (transformers' generate drops its cache at this step for the same reason)."""
        end = start + tokens.shape[1]
        cache.tokens[:, start:end] = tokens
        if start > 0 and self.rotary.crosses_switch(start, end):
            return cache.tokens[:, :end], 0
        return tokens, start

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        """Logits [V] (float32) of one token (a one-element tensor) at ``position``: the forward,
        replayed from CUDA graphs on a CUDA device (see :mod:`dymoe.models.decode_graphs`)."""
        if not (self.cuda_graphs and cache.k.is_cuda):
            return self(token.view(1, 1), position, cache, last_only=True)[0]
        from dymoe.models.decode_graphs import DecodeGraphs, supports_graphs

        graphs = self._graphs.get(cache)
        if graphs is None:
            if not supports_graphs(self):
                return self(token.view(1, 1), position, cache, last_only=True)[0]
            graphs = self._graphs[cache] = DecodeGraphs(self, cache, record=True)
        return graphs.step(token, position)

    def new_cache(self, batch: int = 1) -> KVCache:
        param = self.lm_head.weight
        return KVCache(self.config, batch, self.context_len, param.device, param.dtype,
                       keep_tokens=self.rotary.switch is not None)

    @property
    def dense_nbytes(self) -> int:
        return sum(p.nbytes for p in self.parameters())


def load_dense(checkpoint, context_len: int, device, dtype: torch.dtype, progress=None) -> MoETransformer:
    """Build the model on ``device`` and fill every non-expert weight from ``checkpoint``.

    Shapes are checked against config.json (a mismatch names tensor and file); tied embeddings are
    honoured when the config asks for them or the checkpoint has no ``lm_head.weight``.
    """
    config = checkpoint.config
    with torch.device("meta"):
        model = MoETransformer(config, context_len)
    model.to_empty(device=device).to(dtype=dtype)
    tied = config.tie_word_embeddings or not checkpoint.has("lm_head.weight")
    for name, param in model.named_parameters():
        source = "model.embed_tokens.weight" if (tied and name == "lm_head.weight") else checkpoint.tensor_name(name)
        tensor = checkpoint.get(source, tuple(param.shape))
        with torch.no_grad():
            param.copy_(tensor)
        if progress is not None:
            progress.update(tensor.nbytes)
    model.rotary.build(device, dtype)
    model.requires_grad_(False)
    model.eval()
    return model
