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

from dymoe.models.config import ModelConfig
from dymoe.models.layers import DenseMLP


class ExpertProvider(Protocol):
    def run_experts(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden [N, H]; expert_ids, expert_weights [N, k]; returns sum_j w[:, j] * expert_j(hidden), [N, H]."""
        ...


class Router(nn.Module):
    """Softmax router; top-k weights renormalised when the family asks (norm_topk_prob).

    DeepSeek's variants: sigmoid scores (V3), a choice limited to the ``topk_group`` best of
    ``n_group`` expert groups (V2's group_limited_greedy, V3's noaux_tc with its per-expert
    ``e_score_correction_bias``, which steers the choice but not the weights), and weights times
    ``routed_scaling_factor``.
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
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (expert ids [N, k] int64, weights [N, k] in x's dtype)."""
        logits = self.logits(x).float()
        probs = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        if self.topk_method == "greedy":
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
        else:
            ids = torch.topk(self._group_limited(probs), self.top_k, dim=-1).indices
            weights = probs.gather(1, ids)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return ids, weights.to(x.dtype)

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


class MoEBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = Router(config)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        self.experts: ExpertProvider | None = None  # set by the model once the runtime exists

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = self.gate(flat)
        out = self.experts.run_experts(self.layer, flat, ids, weights)
        if self.shared_expert is None:
            return out.view(shape)
        if self.shared_expert_gate is None:  # DeepSeek: shared experts always on, at full weight
            return (out + self.shared_expert(flat)).view(shape)
        return (out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)).view(shape)
