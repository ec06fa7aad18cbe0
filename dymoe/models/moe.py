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
    """Softmax router; top-k weights renormalised when the family asks (norm_topk_prob)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (expert ids [N, k] int64, weights [N, k] in x's dtype)."""
        probs = torch.softmax(self.logits(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)


class MoEBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = Router(config)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.experts: ExpertProvider | None = None  # set by the model once the runtime exists

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = self.gate(flat)
        out = self.experts.run_experts(self.layer, flat, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(shape)
