"""Mixed-precision rules: which of a layer's experts run at the high precision, which at the low one.

An :class:`~dymoe.runtime.offload.OffloadedExperts` with two slot classes (``precision`` and
``low_precision``) asks its rule once per MoE layer; the slot classes, the waves, the substitution
of a resident copy and the depth floor of critical layers are the runtime's, shared by every rule.

* :class:`ImportanceRule` (DyMoE, arXiv 2603.19172): per token, the experts holding ``mass`` of its
  router weight run high, the rest low; in prefill an expert runs high if it is important for any of
  its tokens. The look-ahead prefetch moves the low copies (cheap to move; DyMoE's look-ahead).
* :class:`PopularityRule` (Fate, arXiv 2502.12224): one token (decode) runs every expert high; in a
  many-token batch (prefill) an expert that few of the batch's tokens chose (fewer than ``floor``
  times the balanced share, tokens x k / experts) runs low, so its copy moves at the low bit width
  where many experts are needed at once. The cross-layer prefetch serves decode, so it moves high
  copies.
"""

from __future__ import annotations

from typing import Protocol

import torch


class PrecisionRule(Protocol):
    """Which experts of one MoE layer's step run at the high precision."""

    prefetch_low: bool  # whether the cross-layer prefetch moves the low copies
    decode_mixed: bool  # whether decode_high may ever send a token's experts to the low class

    def decode_high(self, weights: torch.Tensor) -> torch.Tensor | None:
        """One token: how many of its experts (router weights sorted descending, as top-k returns
        them) run high, as a device scalar joined into the step's one host sync; None: all of them."""

    def prefill_high(self, expert_ids: torch.Tensor, expert_weights: torch.Tensor, experts: list[int],
                     counts: list[int]) -> set[int]:
        """Many tokens (``expert_ids``/``expert_weights`` [N, k]; ``experts`` the used ones and
        ``counts`` how many of the N tokens chose each): the experts that run high."""


def important_count(weights: torch.Tensor, mass: float) -> torch.Tensor:
    """DyMoE's importance rule for one token: how many of its experts (router weights sorted
    descending, as top-k returns them) it takes, in order, to reach ``mass`` of the total weight —
    at least one. Stays on the device until the step's one synchronisation."""
    w = weights.float()
    before = torch.cumsum(w, 0) - w
    return (before < mass * w.sum()).sum().clamp(min=1)


class ImportanceRule:
    """DyMoE: the experts that hold ``mass`` of a token's router weight run high."""

    prefetch_low = True
    decode_mixed = True

    def __init__(self, mass: float):
        self.mass = mass

    def decode_high(self, weights: torch.Tensor) -> torch.Tensor:
        return important_count(weights, self.mass)

    def prefill_high(self, expert_ids, expert_weights, experts, counts) -> set[int]:
        """An expert runs high if it is important (see :func:`important_count`) for any of its tokens."""
        w = expert_weights.float()
        ranked = torch.argsort(w, dim=-1, descending=True)
        before = torch.cumsum(torch.gather(w, -1, ranked), -1) - torch.gather(w, -1, ranked)
        important_ranked = before < self.mass * w.sum(-1, keepdim=True)
        important = torch.zeros_like(important_ranked).scatter_(-1, ranked, important_ranked)
        return set(expert_ids[important].unique().tolist())


class PopularityRule:
    """Fate: every expert high in decode; in prefill, the unpopular experts low.

    An expert is unpopular in a batch of N tokens routed top-k over E experts when fewer than
    ``floor * N * k / E`` of the tokens chose it, N*k/E being the load a perfectly balanced router
    would give it. Its quantization error then touches few tokens while its copy costs as much as a
    popular one's, which is the trade Fate makes. The threshold scales with the prompt; a prompt
    shorter than E / (floor * k) tokens has no unpopular expert and runs like decode. The default
    0.5 (under half the balanced load) is measured on the demo model (docs/benchmarks.md): 1.0 sent
    half of a 256-token prompt's experts to int2 and gave 7x static-int4's KL, 0.5 a fifth and 2x.
    """

    prefetch_low = False
    decode_mixed = False

    def __init__(self, num_experts: int, floor: float = 0.5):
        self.num_experts = num_experts
        self.floor = floor

    def decode_high(self, weights: torch.Tensor) -> None:
        return None

    def prefill_high(self, expert_ids, expert_weights, experts, counts) -> set[int]:
        tokens, k = expert_ids.shape
        threshold = self.floor * tokens * k / self.num_experts
        return {e for e, n in zip(experts, counts) if n >= threshold}


def make_precision_rule(name: str, *, important_mass: float, popularity_floor: float,
                        num_experts: int) -> PrecisionRule:
    """The rule an :class:`~dymoe.runtime.offload.OffloadConfig` names: ``importance`` or ``popularity``."""
    if name == "importance":
        return ImportanceRule(important_mass)
    if name == "popularity":
        return PopularityRule(num_experts, popularity_floor)
    raise ValueError(f"unknown precision rule {name!r}: choose importance or popularity")
