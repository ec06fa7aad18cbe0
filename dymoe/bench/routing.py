"""Skewed, local routing for synthetic models: a labelled stand-in for a trained router.

Random router weights route almost uniformly and, for consecutive tokens, almost the same way
(a random model's hidden states barely move), so a cache looks useless under one and a prefetcher
looks perfect. ``--routing skewed`` replaces the *choice* of experts of every MoE layer with a
seeded random process that has the two properties offloading lives on, calibrated in docs/routing.md:

* skew: layer l draws experts from a Zipf popularity, ``p(rank i) ~ i**-s``, over its own random
  permutation of the experts (so the hot experts differ per layer);
* temporal locality: each expert of position t-1 is kept at position t with probability ``r``; the
  free places are refilled from the popularity, without replacement (Gumbel top-k), never repeating
  a kept expert.

The choice is a function of (seed, layer, position) only, so the resident model and every
offloading runtime route a prompt identically, and a prefill of N tokens routes position t exactly
as a decode step at t does. The *weights* still come from the layer's real router: the softmax of
its logits on the hidden state, gathered at the chosen experts and renormalised when the family
does (``norm_topk_prob``), or for Phi-MoE sparsemixer's masked softmaxes at the chosen experts
(:meth:`Router.weigh <dymoe.models.moe.Router.weigh>`), so expert outputs depend on the hidden state as usual.

The cross-layer predictor (:class:`~dymoe.runtime.offload.CrossLayerPredictor`) asks a router's
:meth:`~PositionalRouter.predict`; here each expert of the true set is visible with probability
``q`` (fixed per seed, layer, position and slot) and the hidden ones are replaced by popularity
draws, so prefetch recall is about ``q`` plus chance, not the oracle a position-indexed router
would otherwise be.

Every random number is a hash of (seed, layer, stream, position, slot), a counter-based generator,
so a table is the same whatever the context length, layer count or device it is built for; the
chain over positions is computed once at build time (:func:`route_table`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from dymoe.errors import InputError
from dymoe.models.moe import Router, RoutingClock
from dymoe.quant.kernels import InputPacking

# Defaults, with their sources in docs/routing.md.
DEFAULT_ZIPF = 0.8  # s: fits the trained demo model (docs/routing.md)
DEFAULT_LOCALITY = 0.1  # r: likewise
DEFAULT_PREDICTOR_RECALL = 0.8  # q: the demo card (76-81%) and FATE-style figures on Qwen3-30B
KINDS = ("uniform", "skewed")
UNIFORM_LABEL = "random routers (near uniform: the worst case of a cache)"

_STREAM_PERMUTATION, _STREAM_KEEP, _STREAM_DRAW, _STREAM_VISIBLE, _STREAM_GUESS = range(5)
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class SyntheticRouting:
    """How a synthetic model routes: ``uniform`` (its random routers' own choice) or ``skewed``
    (Zipf exponent ``zipf`` = s, locality ``locality`` = r, predictor recall ``predictor_recall`` = q)."""

    kind: str = "uniform"
    zipf: float = DEFAULT_ZIPF
    locality: float = DEFAULT_LOCALITY
    predictor_recall: float = DEFAULT_PREDICTOR_RECALL

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"--routing {self.kind!r}: choose uniform or skewed[:s=S,r=R,q=Q]")
        if self.zipf < 0:
            raise InputError(f"--routing: the Zipf exponent s must be >= 0, got {self.zipf}")
        for name, value in (("r", self.locality), ("q", self.predictor_recall)):
            if not 0 <= value <= 1:
                raise InputError(f"--routing: {name} is a probability in [0, 1], got {value}")

    @property
    def skewed(self) -> bool:
        return self.kind == "skewed"

    @property
    def spec(self) -> str:
        """The ``--routing`` value that reproduces this."""
        if not self.skewed:
            return "uniform"
        return f"skewed:s={self.zipf:g},r={self.locality:g},q={self.predictor_recall:g}"

    @property
    def label(self) -> str:
        """What every table, report and trace says about this routing (never mistaken for a trained router)."""
        if not self.skewed:
            return UNIFORM_LABEL
        return (f"SYNTHETIC skewed routing, not a trained router: Zipf s={self.zipf:g} per layer, "
                f"locality r={self.locality:g}, predictor recall q={self.predictor_recall:g} ({self.spec})")

    def to_dict(self) -> dict:
        return {**asdict(self), "spec": self.spec, "label": self.label}


def parse_routing(text: str) -> SyntheticRouting:
    """``uniform``, ``skewed`` or ``skewed:s=1.0,r=0.6,q=0.8`` (any subset of the knobs)."""
    kind, _, knobs = text.strip().partition(":")
    names = {"s": "zipf", "r": "locality", "q": "predictor_recall"}
    values = {}
    for item in filter(None, (k.strip() for k in knobs.split(","))):
        key, _, value = item.partition("=")
        if key.strip() not in names or not value:
            raise InputError(f"--routing {text!r}: knobs are s=, r= and q=, e.g. skewed:s=0.8,r=0.5,q=0.8")
        try:
            values[names[key.strip()]] = float(value)
        except ValueError:
            raise InputError(f"--routing {text!r}: {key.strip()}={value} is not a number") from None
    if values and kind != "skewed":
        raise InputError(f"--routing {text!r}: only skewed routing takes s, r and q")
    return SyntheticRouting(kind, **values)


# ---- the random process ---------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, layer: int, stream: int, positions: np.ndarray, width: int) -> np.ndarray:
    """U(0, 1) numbers [len(positions), width], each a hash of (seed, layer, stream, position, column)."""
    key = _mix(np.array([seed & 0xFFFFFFFF, layer, stream], dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    base = _mix(key[0] ^ _mix(key[1] ^ _mix(key[2])))
    with np.errstate(over="ignore"):
        rows = _mix(base ^ (positions.astype(np.uint64)[:, None] * np.uint64(0xD1B54A32D192ED03)))
        bits = _mix(rows ^ _mix(np.arange(width, dtype=np.uint64)[None, :] + np.uint64(1)))
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def popularity(routing: SyntheticRouting, seed: int, layer: int, num_experts: int) -> np.ndarray:
    """Layer ``layer``'s expert probabilities [E]: Zipf(s) over a per-layer random permutation."""
    order = np.argsort(uniforms(seed, layer, _STREAM_PERMUTATION, np.zeros(1), num_experts)[0], kind="stable")
    p = np.empty(num_experts)
    p[order] = np.arange(1, num_experts + 1, dtype=np.float64) ** -routing.zipf
    return p / p.sum()


def _gumbel_scores(log_p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """log p + Gumbel noise: the top k of each row is a draw of k experts without replacement."""
    return log_p[None, :] - np.log(-np.log(u))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argpartition(-scores, k - 1, axis=-1)[..., :k], axis=-1)


def route_table(routing: SyntheticRouting, seed: int, layer: int, num_experts: int, top_k: int,
                length: int) -> tuple[np.ndarray, np.ndarray]:
    """(routes, guesses), each [length, top_k] int64 with sorted rows: the experts of positions
    0..length-1 of one layer, and what the cross-layer predictor is shown of them."""
    positions = np.arange(length)
    log_p = np.log(popularity(routing, seed, layer, num_experts))
    keep = uniforms(seed, layer, _STREAM_KEEP, positions, top_k) < routing.locality
    draws = _gumbel_scores(log_p, uniforms(seed, layer, _STREAM_DRAW, positions, num_experts))
    routes = np.empty((length, top_k), dtype=np.int64)
    routes[0] = _top_k(draws[0], top_k)
    for t in range(1, length):  # the one sequential part: position t keeps some of t-1's experts
        scores = draws[t]
        kept = routes[t - 1][keep[t]]
        if kept.size:
            scores = scores.copy()
            scores[kept] = np.inf
        routes[t] = _top_k(scores, top_k)
    visible = uniforms(seed, layer, _STREAM_VISIBLE, positions, top_k) < routing.predictor_recall
    guesses = _gumbel_scores(log_p, uniforms(seed, layer, _STREAM_GUESS, positions, num_experts))
    shown = np.zeros_like(guesses, dtype=bool)
    np.put_along_axis(shown, routes, visible, axis=1)
    guesses[shown] = np.inf
    return routes, _top_k(guesses, top_k)


# ---- the router -----------------------------------------------------------------------------------


class PositionalRouter(Router):
    """A layer's router whose choice is its row of :func:`route_table` at each token's position
    (read from the model's :class:`~dymoe.models.moe.RoutingClock`) and whose weights are the real
    router's probabilities of those experts. Shares the wrapped router's weight."""

    def __init__(self, router: Router, clock: RoutingClock, routes: np.ndarray, guesses: np.ndarray):
        torch.nn.Module.__init__(self)
        self.weight = router.weight
        self.top_k, self.normalize = router.top_k, router.normalize
        self.sigmoid, self.scaling = router.sigmoid, router.scaling  # DeepSeek's scoring and weight scale
        self.topk_method, self.jitter_eps = router.topk_method, router.jitter_eps  # Phi-MoE's sparsemixer weights
        self.bias = router.bias  # GPT-OSS's router bias
        if hasattr(router, "e_score_correction_bias"):  # kept as a parameter; it steers only a trained choice
            self.e_score_correction_bias = router.e_score_correction_bias
        self.clock = clock
        device = router.weight.device
        self.register_buffer("routes", torch.from_numpy(routes).to(device), persistent=False)
        self.register_buffer("guesses", torch.from_numpy(guesses).to(device), persistent=False)

    def forward(self, x: torch.Tensor, pack: InputPacking | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._route(x, self.routes, pack)

    def packs(self, x: torch.Tensor, pack: InputPacking) -> bool:
        return self.weigh_packs(x, pack)  # (its forward weighs)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictor's view: each true expert visible with probability q, the rest popularity draws."""
        return self._route(x, self.guesses)

    def _route(self, x: torch.Tensor, table: torch.Tensor,
               pack: InputPacking | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.clock.start, int) and x.is_cuda and torch.cuda.is_current_stream_capturing():
            # a graph would freeze this host-side position; decode_graphs.py hands the clock a device-held one
            raise InputError("synthetic skewed routing was captured in a CUDA graph with a host-side position: "
                             "decode eagerly (--eager)")
        return self.weigh(x, self.clock.rows(table, x.shape[0]), pack)


def apply_routing(model, routing: SyntheticRouting, seed: int) -> None:
    """Give ``model`` (a :class:`~dymoe.models.transformer.MoETransformer`) skewed routing: a
    :class:`RoutingClock` the model's forward sets, and a :class:`PositionalRouter` per MoE block
    with tables for the model's whole context. Uniform routing leaves the model as it is."""
    if not routing.skewed:
        return
    config, length = model.config, model.context_len
    clock = RoutingClock()
    for block in model.moe_blocks:
        routes, guesses = route_table(routing, seed, block.layer, config.num_experts, config.num_experts_per_tok,
                                      length)
        block.gate = PositionalRouter(block.gate, clock, routes, guesses)
    model.routing_clock = clock
