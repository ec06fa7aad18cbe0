"""The MoE block: a router picks experts, an :class:`ExpertProvider` runs them.

The block owns only what stays resident (router, Qwen2-MoE's shared expert and its gate). Routed
experts are asked for through :class:`ExpertProvider`, the one interface between the model and the
expert runtime: "here are the hidden states and the routing of layer L, give me the weighted sum
of the chosen experts' outputs". Resident, offloaded and mixed-precision runtimes all implement it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

import dymoe.models.fused as fused
from dymoe.models.config import ModelConfig
from dymoe.models.layers import DenseMLP, Linear
from dymoe.quant.kernels import InputPacking


class ExpertProvider(Protocol):
    """A provider may also offer ``input_packing(layer) -> InputPacking | None``: where its
    one-token step of ``layer`` wants the token's input packed ahead (int4, int3, int2 kernels,
    :class:`~dymoe.quant.kernels.InputPacking`). Where the router's launch can write it
    (:meth:`Router.packs`), the block passes the router that target and ``run_experts`` a
    ``packed_input=`` keyword naming it, filled for this hidden state; never otherwise."""

    def run_experts(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden [N, H]; expert_ids, expert_weights [N, k]; returns sum_j w[:, j] * expert_j(hidden), [N, H]."""
        ...


class RoutingClock:
    """Where the tokens of the model's current forward call sit: positions ``start .. start+tokens-1``
    of every sequence in the batch. Owned by a model whose routing depends on position (the skewed
    routing of synthetic models, :mod:`dymoe.bench.routing`) and set by its forward, or by a CUDA-graph
    decode with the position held on the device; trained routers never read it."""

    supports_static_position = True  # decode_graphs.py may set a device-held position

    def __init__(self):
        self.start, self.tokens = 0, 0

    def set(self, start, tokens: int) -> None:
        """``start``: an int, or a :class:`~dymoe.models.layers.StaticPosition` (its ``index`` [1] on the device)."""
        self.start, self.tokens = start, tokens

    def rows(self, table: torch.Tensor, n: int) -> torch.Tensor:
        """``table`` [positions, ...] at the current positions, one row per flattened token (b-major, n of them)."""
        if not isinstance(self.start, int):  # a device-held position: no host check (it would synchronise)
            rows = table.index_select(0, self.start.index)
            return rows if n == 1 else rows.repeat(n, 1)
        if self.start + self.tokens > table.shape[0] or self.tokens == 0 or n % self.tokens:
            raise ValueError(f"routing table of {table.shape[0]} positions asked for {n} rows at positions "
                             f"{self.start}..{self.start + self.tokens - 1}")
        rows = table[self.start : self.start + self.tokens]
        return rows if n == self.tokens else rows.repeat(n // self.tokens, 1)


class Router(nn.Module):
    """Softmax router; top-k weights renormalised when the family asks (norm_topk_prob).

    DeepSeek's variants: sigmoid scores (V3), a choice limited to the ``topk_group`` best of
    ``n_group`` expert groups (V2's group_limited_greedy, V3's noaux_tc with its per-expert
    ``e_score_correction_bias``, which steers the choice but not the weights), and weights times
    ``routed_scaling_factor``. Phi-MoE's ``sparsemixer``: see :func:`sparsemixer_choice`. GPT-OSS's
    router has a bias; its softmax over the top-k logits equals the renormalised top-k of the full
    softmax (``norm_topk_prob``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.sigmoid = config.router_scoring == "sigmoid"
        self.topk_method = config.topk_method
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scaling = config.routed_scaling_factor
        self.jitter_eps = config.router_jitter_eps
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None  # GPT-OSS

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, pack: InputPacking | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (expert ids [N, k] int64, weights [N, k] in x's dtype). ``pack``: also write
        x as an expert step's packed input, in the same launch (where :meth:`packs` holds)."""
        one_launch = self.topk_method == "greedy" and self._route_decode_applies(x)
        _refuse_pack(pack, one_launch)
        if self.topk_method == "sparsemixer":
            logits = self.logits(x)
            ids = sparsemixer_choice(logits, self.top_k)
            return ids, sparsemixer_weights(logits, ids, self.jitter_eps)
        if one_launch:  # one kernel with the linear
            return fused.route_decode(x, self.weight, self.bias, self.top_k, sigmoid=self.sigmoid,
                                      normalize=self.normalize, scaling=self.scaling, pack=pack)
        if self.topk_method == "greedy" and fused.route_applies(x, self.weight.shape[0]):  # one kernel after the linear
            return fused.route(self.logits(x), self.top_k, sigmoid=self.sigmoid, normalize=self.normalize,
                               scaling=self.scaling, dtype=x.dtype)
        probs = self.scores(x)
        if self.topk_method == "greedy":
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
        else:
            ids = torch.topk(self._group_limited(probs), self.top_k, dim=-1).indices
            weights = probs.gather(1, ids)
        return ids, self.combine_weights(weights).to(x.dtype)

    def _route_decode_applies(self, x: torch.Tensor) -> bool:
        """Whether one token's logits and routing run as one launch (:func:`fused.route_decode`)."""
        return fused.route_applies(x, self.weight.shape[0]) and fused.linear_decode_applies(x, self.weight, self.bias)

    def packs(self, x: torch.Tensor, pack: InputPacking) -> bool:
        """Whether :meth:`forward` writes one token x [1, H] into ``pack`` as it routes: a greedy
        router's one-launch decode route (:meth:`weigh_packs`)."""
        return self.topk_method == "greedy" and self.weigh_packs(x, pack)

    def weigh_packs(self, x: torch.Tensor, pack: InputPacking) -> bool:
        """Whether :meth:`weigh` writes one token x [1, H] into ``pack`` as it weighs: its
        one-launch decode route (:func:`fused.route_decode`), which reads x whole anyway."""
        return (self.topk_method != "sparsemixer" and self._route_decode_applies(x)
                and fused.packs_for(x, pack))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's score for x [N, H], float32: softmax or sigmoid of the logits."""
        logits = self.logits(x).float()
        return torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)

    def weigh(self, x: torch.Tensor, ids: torch.Tensor,
              pack: InputPacking | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This router's weights for experts ``ids`` [N, k] chosen by something else (synthetic
        routing, dymoe/bench/routing.py): (the ids in the router's order, best first as its own
        choice comes; their weights [N, k] in x's dtype). ``pack``: as in :meth:`forward`
        (where :meth:`weigh_packs` holds)."""
        one_launch = self.topk_method != "sparsemixer" and self._route_decode_applies(x)
        _refuse_pack(pack, one_launch)
        if self.topk_method == "sparsemixer":
            logits = self.logits(x)
            ids = ids.gather(1, logits.gather(1, ids).sort(dim=-1, descending=True).indices)
            return ids, sparsemixer_weights(logits, ids, self.jitter_eps)
        if one_launch:
            return fused.route_decode(x, self.weight, self.bias, ids.shape[1], sigmoid=self.sigmoid,
                                      normalize=self.normalize, scaling=self.scaling, ids=ids, pack=pack)
        if fused.route_applies(x, self.weight.shape[0]):
            return fused.route(self.logits(x), ids.shape[1], sigmoid=self.sigmoid, normalize=self.normalize,
                               scaling=self.scaling, dtype=x.dtype, ids=ids)
        weights, order = self.scores(x).gather(1, ids).sort(dim=-1, descending=True)
        return ids.gather(1, order), self.combine_weights(weights).to(x.dtype)

    def combine_weights(self, chosen: torch.Tensor) -> torch.Tensor:
        """The chosen experts' scores [N, k] as the weights their outputs are summed with: renormalised
        when the family asks (norm_topk_prob), times routed_scaling_factor."""
        if self.normalize:
            chosen = chosen / chosen.sum(dim=-1, keepdim=True)
        return chosen * self.scaling if self.scaling != 1.0 else chosen

    def _group_limited(self, probs: torch.Tensor) -> torch.Tensor:
        """Scores to choose by [N, E]: those of experts outside the ``topk_group`` best groups set to
        -inf. A group's score is its best expert's (V2) or its two best experts' sum, bias included (V3)."""
        if self.topk_method == "noaux_tc":
            probs = probs + self.e_score_correction_bias.float()
        grouped = probs.view(probs.shape[0], self.n_group, -1)
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        best = torch.topk(group_scores, self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(probs)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a prefetcher may assume this router picks for ``x`` (Fate's cross-layer gate feeds it
        an earlier layer's input): a trained router's own choice. Synthetic routers override it."""
        return self(x)


def _refuse_pack(pack: InputPacking | None, one_launch: bool) -> None:
    """A router asked to pack its input where it routes without its one-launch decode route: one
    clear error (the block asks :meth:`Router.packs` first; route_decode checks the width)."""
    if pack is not None and not one_launch:
        raise ValueError("this router cannot pack its input for the expert step here (ask Router.packs first)")


def sparsemixer_choice(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Phi-MoE's sparsemixer at inference (arXiv 2409.12136; transformers' eval path): expert ids
    [N, k], each the largest logit of those not chosen yet (the lowest index on a tie)."""
    ids = []
    for _ in range(k):
        ids.append(logits.max(dim=-1, keepdim=True).indices)
        logits = logits.scatter(1, ids[-1], float("-inf"))
    return torch.cat(ids, dim=1)


def sparsemixer_weights(logits: torch.Tensor, ids: torch.Tensor, eps: float) -> torch.Tensor:
    """The weight of each chosen expert [N, k]: a softmax taken at that expert over the experts not
    chosen before it whose logit l is above or close to its logit c, (c - l) / max(|l|, c) <= 2 eps
    (for the router's own choice, nothing is above). The weights are not renormalised (two clear
    choices weigh about 1 each). Computed in the logits' dtype, as transformers does."""
    candidates, weights = logits, []
    for j in range(ids.shape[1]):
        chosen = ids[:, j : j + 1]
        best = logits.gather(1, chosen)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * eps
        weights.append(torch.softmax(candidates.masked_fill(far, float("-inf")), dim=-1).gather(1, chosen))
        candidates = candidates.scatter(1, chosen, float("-inf"))
    return torch.cat(weights, dim=1)


class MoEBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = Router(config)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        self.experts: ExpertProvider | None = None  # set by the model once the runtime exists

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        pack = self.input_packing(flat)
        ids, weights = self.gate(flat, pack)
        return self.finish(flat, self.run_experts(flat, ids, weights, pack)).view(shape)

    def input_packing(self, flat: torch.Tensor) -> InputPacking | None:
        """Where the expert runtime wants one token's input flat [1, H] packed for its step of this
        layer, if the router can write it there as it routes (:class:`ExpertProvider`); else None."""
        request = getattr(self.experts, "input_packing", None)
        if flat.shape[0] != 1 or request is None:
            return None
        pack = request(self.layer)
        return pack if pack is not None and self.gate.packs(flat, pack) else None

    def run_experts(self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    pack: InputPacking | None = None) -> torch.Tensor:
        """The runtime's routed sum for flat [N, H]; ``pack``: :meth:`input_packing`'s target, which
        the router filled for this input."""
        extra = {} if pack is None else {"packed_input": pack}  # (runtimes that never pack take no keyword)
        return self.experts.run_experts(self.layer, flat, ids, weights, **extra)

    def finish(self, flat: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """The block's output from its input [N, H] and the routed experts' sum [N, H]: adds what
        does not go through the expert runtime (shared experts). The CUDA-graph decode calls the
        router, the runtime and this separately (dymoe/models/decode_graphs.py)."""
        if self.shared_expert is None:
            return routed
        if self.shared_expert_gate is None:  # DeepSeek: shared experts always on, at full weight
            return routed + self.shared_expert(flat)
        return routed + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
