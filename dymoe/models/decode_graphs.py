"""One-token decode through CUDA graphs: the dense parts replayed, the expert runtime in between.

Decoding one token is bound by the host: some 80 small kernels per layer, each launched from Python
(docs/benchmarks.md). A CUDA graph replays a recorded sequence of kernels with one launch. An
offloading runtime must see which experts a token routes to before it can fetch them (one host
synchronisation per MoE layer), so a step is cut after each MoE block's router::

    graph 0   embedding, dense layers, attention and router of the first MoE layer
    runtime   run_experts: fetch what is missing, run the expert kernels (eager)
    graph 1   add the routed output (and shared experts) with the next norm, ..., router of the next MoE layer
    ...
    graph n   final norm and LM head

A runtime that never synchronises (``graph_safe``, e.g. the resident experts) is recorded with the
rest, so the whole step is one graph. So is an offloading runtime with a ``mapped_decode``
(:mod:`dymoe.runtime.mapped`): its kernels find each expert through a device table wherever it lies,
and its host bookkeeping (reading the step's record, entering its fills into the cache, setting
slots aside for the next step) runs around each step's replay, a step behind. A runtime with ``deferred_decode`` (an offloading runtime
whose expert kernels read fixed rows once prepared: one precision class, or two padded to k slots
each) splits its step: ``decode_prepare`` (read the routing, fetch, upload slot ids to fixed rows)
runs between graphs (what it reads with the routing, e.g. a prefetcher's guesses, is made on the
device by the runtime's ``routing_row``, recorded after the router), ``decode_compute`` (kernels on fixed buffers) is recorded at the start of the next
segment, and ``decode_finish`` (unpin, fence) follows that segment's replay. The position lives on the device (:class:`StaticPosition`);
attention covers a fixed span of the KV cache per graph (a power of two of at least 256 entries that
covers the position, later entries masked), so a few recordings serve every position. A span is
recorded at the first step that needs it, right after that step ran eagerly (which also warms up
any lazily initialised kernel); later steps replay it. A LongRoPE model's one step past its switch
length runs eagerly, as the plain forward re-runs the whole sequence there (the rotary table row of
every later position already holds the long frequencies).

The same segments run without recording where CUDA is absent (``record=False``): that is how the CPU
tests check this path against the plain forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dymoe.models.layers import KVCache, StaticPosition, add_norm
from dymoe.quant.kernels import InputPacking

MIN_SPAN = 256


@dataclass
class _Segment:
    """What one segment leaves for the next: the residual stream after attention, the MoE input,
    and its routing; or, for the last segment, the logits."""

    h: torch.Tensor | None = None
    flat: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    row: torch.Tensor | None = None  # the runtime's routing_row (deferred decode), recorded with the router
    pack: InputPacking | None = None  # where the router packed the MoE input for the expert step (MoEBlock.input_packing)
    logits: torch.Tensor | None = None


@dataclass
class _Recording:
    graphs: list  # torch.cuda.CUDAGraph per segment (one for a whole-step recording)
    outputs: list[_Segment]


def supports_graphs(model) -> bool:
    """Whether every part of ``model`` that reads the position can read it from the device (the
    attention modules, and the routing clock of position-dependent synthetic routers), and its
    expert runtime does not opt out."""
    clock = getattr(model, "routing_clock", None)
    if clock is not None and not getattr(clock, "supports_static_position", False):
        return False
    if not getattr(model.experts, "decode_graphs", True):  # a runtime may opt out
        return False
    return all(getattr(layer.self_attn, "supports_static_position", False) for layer in model.model.layers)


def span_for(position: int, context_len: int) -> int:
    """The attention span of the recording that serves ``position``."""
    span = MIN_SPAN
    while span <= position:
        span *= 2
    return min(span, context_len)


class DecodeGraphs:
    """Decode steps of ``model`` over ``cache`` (bound to both: recordings hold their addresses)."""

    def __init__(self, model, cache: KVCache, record: bool):
        self.model = model
        self.cache = cache
        self.record = record
        device = model.lm_head.weight.device
        hidden = model.config.hidden_size
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.arange = torch.arange(cache.context_len, device=device)
        self.layers = list(model.model.layers)
        self.moe_at = [i for i, layer in enumerate(self.layers) if hasattr(layer.mlp, "gate")]
        self.routed = [torch.zeros(1, hidden, dtype=model.lm_head.weight.dtype, device=device) for _ in self.moe_at]
        self.positions: dict[int, StaticPosition] = {}
        self.recordings: dict[int, _Recording] = {}
        self.whole = bool(getattr(model.experts, "graph_safe", False))
        # an offloading runtime whose kernels find experts through a device table, wherever they
        # lie (dymoe/runtime/mapped.py): its whole step is recorded, the host's bookkeeping follows
        self.mapped = None if self.whole else getattr(model.experts, "mapped_decode", None)
        self.whole = self.whole or self.mapped is not None
        # a runtime whose compute reads only fixed buffers once prepared: its expert kernels are
        # recorded at the start of the next segment, the host keeps only the bookkeeping
        self.deferred = not self.whole and bool(getattr(model.experts, "deferred_decode", False))
        # on CUDA each MoE layer's routing row goes to pinned host memory inside the segment (one
        # copy node of the graph): after the replay the host waits for the stream and reads it,
        # where reading the device tensor would launch a copy of its own from the host
        self.host_rows: dict[int, torch.Tensor] = {}

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [V] (float32) of the token ``token`` (a one-element tensor) at ``position``."""
        if self.cache.tokens is not None:  # LongRoPE: the step past its switch re-runs the sequence eagerly
            self.cache.tokens[:, position] = token.view(1)
            if self.model.rotary.crosses_switch(position, position + 1):
                return self.model(token.view(1, 1), position, self.cache, last_only=True)[0]
        span = span_for(position, self.cache.context_len)
        pos = self.positions.get(span)
        if pos is None:
            mask = torch.zeros(1, span, dtype=torch.bool, device=self.index.device)
            pos = self.positions[span] = StaticPosition(self.index, span, mask)
        self.token.copy_(token.view(1, 1))
        self.index.fill_(position)
        with self.mapped.step() if self.mapped is not None else contextlib.nullcontext():
            recording = self.recordings.get(span)
            if recording is not None:
                return self._replay(recording)
            logits = self._run(pos)
            if self.record:
                self.recordings[span] = self._capture(pos)
            return logits

    # ---- running, recording, replaying ---------------------------------------------------------

    def _run(self, pos: StaticPosition) -> torch.Tensor:
        out = None
        for s in range(len(self.moe_at) + 1):
            out = self._segment(s, pos, out)
            self._between(s, out)
        return out.logits

    def _between(self, s: int, out: _Segment) -> None:
        """The host's part after segment s: finish layer s-1's deferred compute (queued in segment s),
        then route layer s's experts (deferred: prepare them; else run them)."""
        experts = self.model.experts
        if self.deferred and s > 0:
            experts.decode_finish(self.layers[self.moe_at[s - 1]].mlp.layer)
        if s == len(self.moe_at):
            return
        block = self.layers[self.moe_at[s]].mlp
        if self.deferred:
            if s in self.host_rows:  # the routing row, copied to the host by the segment: wait for it
                torch.cuda.current_stream(out.flat.device).synchronize()
            row = {} if out.row is None else {"row": out.row}  # (runtimes without routing_row take none)
            experts.decode_prepare(block.layer, out.flat, out.ids[0], out.weights[0], **row)
        else:
            self.routed[s].copy_(block.run_experts(out.flat, out.ids, out.weights, out.pack))

    def _capture(self, pos: StaticPosition) -> _Recording:
        pool = torch.cuda.graph_pool_handle()
        if self.whole:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._run(pos)
            return _Recording([graph], [_Segment(logits=logits)])
        graphs, outputs, out = [], [], None
        for s in range(len(self.moe_at) + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._segment(s, pos, out)
            graphs.append(graph)
            outputs.append(out)
        return _Recording(graphs, outputs)

    def _replay(self, recording: _Recording) -> torch.Tensor:
        for s, graph in enumerate(recording.graphs):
            graph.replay()
            if not self.whole:
                self._between(s, recording.outputs[s])
        return recording.outputs[-1].logits

    # ---- one segment: from after MoE layer s-1's router to MoE layer s's router -------------------

    def _segment(self, s: int, pos: StaticPosition, prev: _Segment | None) -> _Segment:
        model, cache, rotary = self.model, self.cache, self.model.rotary
        if s == 0:
            torch.le(self.arange[: pos.span], self.index, out=pos.mask[0])
            if getattr(model, "routing_clock", None) is not None:
                model.routing_clock.set(pos, 1)
            x, pending = model.model.embed_tokens(self.token), None
            first = 0
        else:
            block = self.layers[self.moe_at[s - 1]].mlp
            if self.deferred:
                extra = {} if prev.pack is None else {"packed_input": prev.pack}
                routed = model.experts.decode_compute(block.layer, prev.flat, prev.weights[0], **extra)
            else:
                routed = self.routed[s - 1]
            x, pending = prev.h, block.finish(prev.flat, routed).view_as(prev.h)  # added with the next norm
            first = self.moe_at[s - 1] + 1
        last = self.moe_at[s] if s < len(self.moe_at) else len(self.layers)
        for layer in self.layers[first:last]:
            x, pending = layer(x, pos, cache, rotary, pending)
        if s == len(self.moe_at):
            _, normed = add_norm(x, pending, model.model.norm)
            return _Segment(logits=model.lm_head(normed[:, -1]).float()[0])
        layer = self.layers[last]
        x, normed = layer.input_norm(x, pending)
        h, flat = add_norm(x, layer.self_attn(normed, pos, cache, rotary), layer.post_attention_layernorm)
        flat = flat.view(1, -1)
        pack = layer.mlp.input_packing(flat)  # (nothing writes the target before decode_compute reads it)
        ids, weights = layer.mlp.gate(flat, pack)
        routing_row = getattr(model.experts, "routing_row", None) if self.deferred else None
        row = routing_row(layer.mlp.layer, flat, ids[0], weights[0]) if routing_row is not None else None
        if row is not None and row.is_cuda:
            host = self.host_rows.get(s)
            if host is None or host.shape != row.shape:
                host = self.host_rows[s] = torch.empty(row.shape, dtype=row.dtype, pin_memory=True)
            row = host.copy_(row, non_blocking=True)
        return _Segment(h=h, flat=flat, ids=ids, weights=weights, row=row, pack=pack)
