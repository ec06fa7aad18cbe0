"""Routing traces: which experts every token chose in every MoE layer, and what a predictor guessed.

A trace is recorded once from a real model run and replayed many times by the simulator
(:mod:`dymoe.bench.simulate`) under other policies, budgets and links, without the model.
:class:`TracingExperts` wraps any :class:`~dymoe.models.moe.ExpertProvider`: it writes down, per
forward call and MoE layer, the chosen expert ids and router weights, and the guesses of the
cross-layer predictor of Fate (arXiv 2502.12224): the router of layer l+d applied to the hidden state
that enters layer l's MoE block (the post-attention RMSNorm output, the ``flat`` the block hands to
``run_experts``). Then it passes the call on unchanged, so the run's tokens are those of an
untraced run.

File format (one ``.safetensors`` file, :data:`FORMAT_VERSION`): tensors

===============  =====================  =====================================================
name             shape, dtype           meaning
===============  =====================  =====================================================
``calls``        [C, 3] int64           per forward call: sequence, first position, tokens
``ids``          [L, T, k] int16        expert chosen by token t at MoE layer l (T: all calls)
``weights``      [L, T, k] float32      its router weight (renormalised as the model does)
``predicted``    [L, D, T, k] int16     layer l+1+d's top-k guessed from layer l's gate input
                                        (-1 where layer l+1+d does not exist)
===============  =====================  =====================================================

and a JSON header in the safetensors metadata (key ``dymoe_trace``): format and version, the model's
fingerprint (config.json and router weights), a config summary, the expert bytes per precision,
and how the trace was made. Positions assume batch 1 (what the engine runs).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

import dymoe
from dymoe.errors import InputError

FORMAT = "dymoe-trace"
FORMAT_VERSION = 1
PRECISIONS = ("bf16", "int8", "int4", "int2")


@dataclass
class Trace:
    """A recorded routing trace; see the module docstring for the meaning of each tensor."""

    header: dict
    calls: torch.Tensor  # [C, 3] (sequence, start position, tokens)
    ids: torch.Tensor  # [L, T, k]
    weights: torch.Tensor  # [L, T, k]
    predicted: torch.Tensor  # [L, D, T, k]
    layers: list[int] = field(default_factory=list)  # the MoE layers' decoder indices, in order

    def __post_init__(self):
        if not self.layers:
            self.layers = list(self.header["model"]["moe_layers"])

    # -- shape ----------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return int(self.header["model"]["num_experts"])

    @property
    def top_k(self) -> int:
        return self.ids.shape[2]

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[1]

    @property
    def lookahead(self) -> int:
        return self.predicted.shape[1]

    def steps(self):
        """Yield ``(position, start, tokens)`` per forward call in recording order: the call's first
        position in its sequence (0: a prefill; otherwise a decode step) and its first row in
        ``ids``."""
        start = 0
        for _, position, n in self.calls.tolist():
            yield position, start, n
            start += n

    def decode_tokens(self) -> int:
        """Tokens of decode steps (calls after a sequence's prefill)."""
        return sum(n for _, position, n in self.calls.tolist() if position > 0)

    # -- statistics -----------------------------------------------------------------------------

    def predictor_recall(self, depth: int = 1) -> dict[int, float]:
        """Recall of the cross-layer predictor: per source layer l (decoder index), the share of
        layer l+depth's true top-k that the router of l+depth, applied to l's gate input, found.
        Column l of the demo model card's table is this figure for source layer l."""
        if not 1 <= depth <= self.lookahead:
            raise InputError(f"this trace holds predictions {self.lookahead} layer(s) ahead, not {depth}")
        recall = {}
        for i in range(len(self.layers) - depth):
            truth, guess = self.ids[i + depth].long(), self.predicted[i, depth - 1].long()
            found = (guess.unsqueeze(-1) == truth.unsqueeze(-2)).any(-1).sum().item()
            recall[self.layers[i]] = found / max(truth.numel(), 1)
        return recall

    @property
    def routing(self) -> str:
        """What chose the experts (traces from before this key existed were all of trained models or
        of near-uniform random synthetic ones; they say "not recorded")."""
        return self.header["model"].get("routing", "not recorded")

    def describe(self) -> str:
        m = self.header["model"]
        prefill = self.num_tokens - self.decode_tokens()
        sequences = len(set(self.calls[:, 0].tolist())) if len(self.calls) else 0
        return (f"{m['name']} ({m['family']}), {len(self.layers)} MoE layers x {m['num_experts']} experts, "
                f"top-{self.top_k}; {sequences} sequences, {prefill} prefill + {self.decode_tokens()} decode tokens")

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"calls": self.calls, "ids": self.ids, "weights": self.weights, "predicted": self.predicted}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"dymoe_trace": json.dumps(self.header, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """Read a trace file; an unreadable file or another format version is an :class:`InputError`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"no trace file at {path}: record one with `dymoe simulate {path} --record MODEL`")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("dymoe_trace", "null"))
                _check_header(header, path)
                tensors = {k: f.get_tensor(k) for k in ("calls", "ids", "weights", "predicted")}
        except InputError:
            raise
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise InputError(f"{path} is not a readable dymoe trace ({exc})") from None
        return cls(header, **tensors)


def _check_header(header, path: Path) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InputError(f"{path} is a safetensors file but not a dymoe trace (no dymoe_trace header)")
    if header.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path} has trace format version {header.get('format_version')}, this dymoe reads "
                         f"version {FORMAT_VERSION}: record it again")


class TracingExperts:
    """An :class:`~dymoe.models.moe.ExpertProvider` that records routing, then calls ``inner``.

    ``routers`` maps each MoE layer (decoder index, in order) to its router; with ``lookahead`` D,
    every call of layer l also records the top-k of the next D MoE layers' routers applied to l's
    gate input. A call of the first MoE layer starts a new forward call; :meth:`start_sequence`
    marks a new prompt (positions restart at 0). Other attributes (``stats``, ``report``,
    ``metrics``) are the inner provider's.
    """

    graph_safe = False  # it reads each step's routing back to the host: never inside a CUDA graph
    deferred_decode = False  # and it records in run_experts, which a split decode would bypass

    def __init__(self, inner, routers: dict, lookahead: int = 1):
        if lookahead < 1:
            raise InputError(f"lookahead must be >= 1, got {lookahead}")
        self.inner = inner
        self.routers = dict(routers)
        self.layers = list(self.routers)
        self.lookahead = lookahead
        self.calls: list[list[int]] = []
        self._records = {layer: ([], [], []) for layer in self.layers}  # ids, weights, predicted
        self._sequence, self._position = -1, 0
        self.start_sequence()

    @classmethod
    def around(cls, model, lookahead: int = 1) -> "TracingExperts":
        """Wrap ``model``'s current expert provider, reading the routers from its MoE blocks."""
        return cls(model.experts, {block.layer: block.gate for block in model.moe_blocks}, lookahead)

    def start_sequence(self) -> None:
        self._sequence += 1
        self._position = 0

    def run_experts(self, layer, hidden, expert_ids, expert_weights):
        self._record(layer, hidden, expert_ids, expert_weights)
        return self.inner.run_experts(layer, hidden, expert_ids, expert_weights)

    def __getattr__(self, name):
        if name == "inner":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _record(self, layer, hidden, expert_ids, expert_weights) -> None:
        n = hidden.shape[0]
        index = self.layers.index(layer)
        if index == 0:
            self.calls.append([self._sequence, self._position, n])
            self._position += n
        ids, weights, predicted = self._records[layer]
        ids.append(expert_ids.to("cpu", torch.int16))
        weights.append(expert_weights.to("cpu", torch.float32))
        guesses = torch.full((self.lookahead, n, expert_ids.shape[1]), -1, dtype=torch.int16)
        for d in range(self.lookahead):
            if index + 1 + d < len(self.layers):
                guess, _ = self.routers[self.layers[index + 1 + d]].predict(hidden)
                guesses[d] = guess.to("cpu", torch.int16)
        predicted.append(guesses)

    def to_trace(self, header: dict) -> Trace:
        """The recording so far as a :class:`Trace` with ``header`` (see :func:`trace_header`)."""
        k = header["model"]["top_k"]
        ids = torch.stack([_cat(self._records[l][0], (0, k), torch.int16) for l in self.layers])
        weights = torch.stack([_cat(self._records[l][1], (0, k), torch.float32) for l in self.layers])
        predicted = torch.stack([_cat(self._records[l][2], (self.lookahead, 0, k), torch.int16, dim=1)
                                 for l in self.layers])
        calls = torch.tensor(self.calls, dtype=torch.int64).view(-1, 3)
        if ids.shape[1] != int(calls[:, 2].sum()):
            raise ValueError("trace is ragged: a forward call did not pass through every MoE layer")
        return Trace(header, calls, ids, weights, predicted, self.layers)


def _cat(parts: list[torch.Tensor], empty_shape, dtype, dim: int = 0) -> torch.Tensor:
    return torch.cat(parts, dim=dim) if parts else torch.empty(empty_shape, dtype=dtype)


def model_fingerprint(model) -> str:
    """A hash of what decides the routing of ``model``: its config and every router's weights
    (hashed as float32, so a model loaded in bf16 or float32 has one fingerprint)."""
    h = hashlib.sha256(json.dumps(_config_summary(model.config), sort_keys=True).encode())
    for block in model.moe_blocks:
        h.update(block.gate.weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        for table in ("routes", "guesses"):  # synthetic skewed routing (bench/routing.py): its choices
            if hasattr(block.gate, table):
                h.update(getattr(block.gate, table)[:64].to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def expert_bytes(config, group_size: int = 128) -> dict[str, int]:
    """Bytes of one expert blob (what a fetch moves, page aligned as in the store) per precision."""
    from dymoe.checkpoint.blob import expert_blob_bytes

    return {p: expert_blob_bytes(config, p, group_size) for p in PRECISIONS}


def _config_summary(config) -> dict:
    return {"family": config.family, "num_layers": config.num_layers, "moe_layers": list(config.moe_layers),
            "num_experts": config.num_experts, "top_k": config.num_experts_per_tok,
            "hidden_size": config.hidden_size, "moe_intermediate_size": config.moe_intermediate_size}


TRAINED_ROUTING = "trained routers of the checkpoint"


def trace_header(engine, name: str, recipe: dict | None = None, lookahead: int = 1,
                 routing: str = TRAINED_ROUTING) -> dict:
    """The header of a trace recorded from ``engine``: format, model fingerprint and summary (with
    ``routing``, what chose the experts: a synthetic model's label says so), expert bytes per
    precision, and ``recipe`` (how the prompts and generation were chosen)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dymoe_version": dymoe.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": name, "fingerprint": model_fingerprint(engine.model), **_config_summary(engine.config),
                  "routing": routing},
        "expert_bytes": expert_bytes(engine.config),
        "recorded_on": {"device": str(engine.device), "dtype": str(engine.model.lm_head.weight.dtype),
                        "policy": engine.preset},
        "lookahead": lookahead,
        "recipe": recipe or {},
    }


def record_trace(engine, prompts: Sequence[Sequence[int]], gen_len: int, *, lookahead: int = 1,
                 name: str | None = None) -> Trace:
    """Run each prompt (token ids) through ``engine`` with greedy decoding of up to ``gen_len``
    tokens, recording the routing of every prefill and decode call; the engine's expert provider is
    restored afterwards. The tokens generated are those of an untraced run."""
    from dymoe.engine.sampling import SamplingParams

    tracer = TracingExperts.around(engine.model, lookahead)
    inner = engine.model.experts
    engine.model.attach_experts(tracer)
    try:
        for i, prompt in enumerate(prompts):
            if i:
                tracer.start_sequence()
            for _ in engine.generate(list(prompt), SamplingParams(max_new_tokens=gen_len)):
                pass
    finally:
        engine.model.attach_experts(inner)
    name = name or Path(engine.checkpoint.path).name
    recipe = {"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "gen_len": gen_len,
              "sampling": "greedy"}
    return tracer.to_trace(trace_header(engine, name, recipe, lookahead))
