"""Quality figures: perplexity of a text, and how far a preset's next-token distributions are from
the resident reference's.

Against the reference (DESIGN.md, "Measuring"), for each position where the resident model chose
its greedy token ``t``:

* top-1 agreement: the preset's argmax equals the reference's;
* perplexity of the reference continuation: ``exp(mean -log p_preset(t))``, the resident model's
  own greedy continuation scored by the preset (the resident row is the floor of this column);
* ``KL(resident || preset)``: ``sum_v p_res(v) (log p_res(v) - log p_preset(v))``, mean over positions.

At full precision offloading is invisible (invariant 2): agreement 1, KL 0, the same perplexity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class Agreement:
    """Sums over positions, so runs over several prompts add up before the means are taken."""

    positions: int = 0
    agree: int = 0
    nll: float = 0.0  # sum of -log p_preset(reference token)
    kl: float = 0.0  # sum of KL(resident || preset)

    def add(self, other: "Agreement") -> None:
        self.positions += other.positions
        self.agree += other.agree
        self.nll += other.nll
        self.kl += other.kl

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.positions if self.positions else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.positions) if self.positions else float("nan")

    @property
    def kl_mean(self) -> float:
        return self.kl / self.positions if self.positions else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "top1_agreement": self.top1_agreement, "perplexity": self.perplexity,
                "kl_mean": self.kl_mean}


def compare(reference_logprobs: torch.Tensor, reference_tokens: torch.Tensor, logits: torch.Tensor) -> Agreement:
    """``reference_logprobs`` [N, V] (log-softmax of the resident logits), ``reference_tokens`` [N]
    (its greedy choices), ``logits`` [N, V] of the preset at the same positions."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    nll = -logprobs.gather(1, reference_tokens.view(-1, 1)).sum()
    kl = F.kl_div(logprobs, reference_logprobs, log_target=True, reduction="sum")
    agree = (logprobs.argmax(-1) == reference_logprobs.argmax(-1)).sum()
    return Agreement(positions=reference_tokens.numel(), agree=int(agree), nll=float(nll), kl=max(float(kl), 0.0))


def perplexity(model, ids: list[int], window: int | None = None, progress: bool = False) -> tuple[float, int]:
    """Perplexity of token ids ``ids`` under ``model``: every token but the first predicted once, in
    consecutive windows of ``window`` tokens (default: the model's context). Returns (ppl, tokens scored)."""
    window = window or model.context_len
    device = model.lm_head.weight.device
    starts = range(0, len(ids) - 1, window)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="eval", unit="window", leave=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in starts:
            chunk = torch.tensor(ids[start : start + window + 1], device=device)
            logits = model(chunk[:-1].view(1, -1), 0, model.new_cache(1))[0]
            total += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
            count += chunk.numel() - 1
    return math.exp(total / count), count
