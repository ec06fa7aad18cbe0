"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, then a draw.

The order and the arithmetic are those of transformers' default logits processors
(``RepetitionPenaltyLogitsProcessor`` -> ``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` ->
``TopPLogitsWarper``), so the distribution a token is drawn from equals the one ``generate`` draws
from for the same logits. Everything is whole-tensor torch work on the logits' device: no Python
loop over the vocabulary and no host round trip until the caller reads the token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dymoe.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` are off.

    ``repetition_penalty`` (CTRL, arXiv 1909.05858) > 1 discourages every token already in the prompt
    or the generated text, < 1 encourages it. ``seed`` makes sampling reproducible (None: a fresh
    random seed). Generation ends after ``max_new_tokens`` or at the first of the ``stop`` strings.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, "a finite number >= 0 (0 = greedy)", lambda v: v >= 0)
        _check_int("top_k", self.top_k, "an integer >= 0 (0 = off)", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "a number in (0, 1] (1 = off)", lambda v: 0 < v <= 1)
        _check_number("repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 = off)", lambda v: v > 0)
        if self.seed is not None:
            _check_int("seed", self.seed, "an integer in [0, 2**64) or None", lambda v: 0 <= v < 2**64)
        _check_int("max_new_tokens", self.max_new_tokens, "an integer >= 1", lambda v: v >= 1)
        self._check_stop()

    def _check_stop(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise InputError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_number(name: str, value, what: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise InputError(f"sampling parameter {name} must be {what}, got {value!r}")


def _check_int(name: str, value, what: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise InputError(f"sampling parameter {name} must be {what}, got {value!r}")


class Sampler:
    """Draws tokens for one request with its own seeded ``torch.Generator`` on ``device``."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def process(self, logits: torch.Tensor, previous_ids: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """float32 logits [B, V] after repetition penalty, temperature, top-k and top-p (removed = -inf).

        ``logits`` is [V] or [B, V]; ``previous_ids`` is [T] or [B, T] (prompt plus generated ids).
        Greedy parameters apply only the repetition penalty, as greedy ``generate`` does.
        """
        scores = logits.reshape(-1, logits.shape[-1]).float()
        if scores.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
            scores = scores.clone()  # the steps below work in place; never write into the caller's logits
        p = self.params
        if p.repetition_penalty != 1.0 and previous_ids is not None:
            scores = apply_repetition_penalty(scores, _as_ids(previous_ids, scores), p.repetition_penalty)
        if p.greedy:
            return scores
        if p.temperature != 1.0:
            scores.div_(p.temperature)
        if p.top_k > 0:
            scores = apply_top_k(scores, p.top_k)
        if p.top_p < 1.0:
            scores = apply_top_p(scores, p.top_p)
        return scores

    def probabilities(self, logits: torch.Tensor, previous_ids=None) -> torch.Tensor:
        """The distribution [B, V] the next token is drawn from (one-hot at the argmax when greedy)."""
        scores = self.process(logits, previous_ids)
        if self.params.greedy:
            return torch.zeros_like(scores).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0)
        return scores.softmax(-1)

    def sample(self, logits: torch.Tensor, previous_ids: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """The next token id: a 0-d long tensor for [V] logits, a [B] one for [B, V] logits."""
        if self.params.greedy and self.params.repetition_penalty == 1.0:
            return logits.argmax(-1)  # no copy, no float cast: argmax is the same on the raw logits
        scores = self.process(logits, previous_ids)
        if self.params.greedy:
            tokens = scores.argmax(-1)
        else:
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(-1)
        return tokens[0] if logits.dim() == 1 else tokens


def _as_ids(previous_ids, scores: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(previous_ids, dtype=torch.long, device=scores.device)
    return ids.reshape(1, -1).expand(scores.shape[0], -1) if ids.dim() < 2 else ids


def apply_repetition_penalty(scores: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty, in place: seen tokens' logits divided by ``penalty`` if positive, multiplied if negative.

    Only the [B, T] seen positions are gathered and scattered back, so the cost is O(T), not O(V).
    A token seen twice is written twice with the same value, so it is penalised once.
    """
    if previous_ids.shape[-1] == 0:
        return scores
    seen = scores.gather(-1, previous_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter_(-1, previous_ids, seen)


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (and any tied with the k-th), in place."""
    k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill_(scores < kth, -math.inf)


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one), in place.

    Sorted ascending, a token goes when the mass at or below it is <= 1 - top_p: the same test
    (and so the same ties and rounding) as transformers' ``TopPLogitsWarper``.
    """
    sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum_(-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return scores.masked_fill_(remove, -math.inf)
