"""ResidentExperts: every routed expert kept in device memory at the checkpoint's precision.

It is the `resident` preset (the upper bound when everything fits) and the reference the
offloading runtimes are checked against (invariant 2 of DESIGN.md).

Two paths compute the same function. Prefill groups tokens by expert (one matmul pair per expert
used). Decode (one token), by default on a GPU with Triton, runs the fused decode kernels of
:mod:`dymoe.quant.kernels`, the low-bit slots' entry point: the resident model keeps each layer's
experts as bf16 blobs in one buffer, laid out as an offloading runtime's bf16 slots
(:func:`blob_stacks`: the stacks are views of it, so prefill reads them as before), and both decode
one token with :func:`kernels_decode_experts`, so they compute alike (invariant 2). On an H100,
8 layers of the synthetic Qwen3-30B-A3B shape: resident TPOT 1.24 -> 1.02 ms against the grouped
GEMMs below (docs/decode.md).

Without Triton, or with ``DYMOE_RESIDENT_DECODE=grouped``, decode runs through two grouped GEMMs
over the whole stacks, each expert a group of one row or none (:func:`grouped_decode`, where
grouped GEMMs run: bf16 on sm_90+): the weights are read in place, with no device-to-host
synchronisation, so the host can queue the next layers while the GPU works and CUDA graphs record
it (docs/decode.md). On other GPUs, or with ``DYMOE_RESIDENT_DECODE=gather``, it gathers the k
chosen experts' weights by index and runs two batched matmuls (:func:`gathered_decode`; the gather
copies the weights first, three times their bytes: 8-layer resident TPOT 1.74 ms against 1.61
grouped on an H100). On the CPU it runs one matrix-vector product per expert on the weights in
place (:func:`looped_decode`: 7x faster than gathering at Qwen3's and Mixtral's expert sizes; tiny
test models still gather). Offloading runtimes decode their bf16 slots through the same function
(:func:`decode_experts`), and on the H100 the resident model and ``lru`` with bf16 slots gave the
same logits bit for bit under either setting (invariant 2, docs/decode.md). The decode paths sum
the k expert outputs in router order like the prefill path, but through other GEMMs, so they agree
with it to float rounding, not bit for bit; ``gather_decode=False`` keeps the prefill path
everywhere (the bit-exact reference the offloading runtimes are compared with in the CPU tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dymoe.models.fused as fused
from dymoe.checkpoint.blob import BlobLayout, blob_layout
from dymoe.env import env_choice
from dymoe.models.expert_math import SWIGLU, ExpertMath
from dymoe.quant.formats import parse_format
from dymoe.quant.kernels import (decode_workspace, interpreting, kernels_run_on, routed_decode,
                                 triton_available)
from dymoe.runtime.expert_compute import MAX_GROUPS, combine_rows, grouped_experts, grouped_mm_usable, run_grouped


def _decode_setting() -> str:
    return env_choice("DYMOE_RESIDENT_DECODE", {
        "auto": "the default: kernels on a GPU with Triton, else grouped",
        "kernels": "the fused Triton decode kernels, resident and bf16 slots alike (a GPU with Triton, or "
                   "Triton's interpreter), else grouped",
        "grouped": "two grouped GEMMs over the whole stacks (bf16 on sm_90+)",
        "gather": "gather the k experts' weights, two batched matmuls"}, "auto")


DECODE = _decode_setting()


def kernels_decode(device, dtype: torch.dtype) -> bool:
    """Whether bf16 experts on ``device`` decode through the fused kernels: bf16 weights, Triton
    installed, and a GPU of compute capability 8.0+ (Ampere: the kernels' bf16 tiles run on tensor
    cores; ``DYMOE_RESIDENT_DECODE`` unset, ``auto``, or ``kernels``), or the CPU under Triton's
    interpreter (``TRITON_INTERPRET=1``) with ``kernels`` said outright (the tests)."""
    device = torch.device(device)
    on = kernels_run_on(device) if device.type == "cuda" else DECODE == "kernels" and interpreting() and triton_available()
    return DECODE in ("auto", "kernels") and dtype == torch.bfloat16 and on


def kernels_decode_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, buffer: torch.Tensor,
                           table: torch.Tensor, layout: BlobLayout, workspace=None,
                           math: ExpertMath = SWIGLU) -> torch.Tensor:
    """One token x [1, H] through experts ``ids`` [k] whose bf16 blobs lie in ``buffer`` at byte
    offsets ``table[ids]`` (``weights`` [k]): the fused decode kernels, the experts summed in router
    order. The resident model and an offloading runtime's bf16 slots both decode here under
    :func:`kernels_decode`."""
    # "triton", not "auto": where kernels_decode holds, that is a GPU or the interpreter on the CPU
    return routed_decode(buffer, table, ids.view(1, -1), weights.view(1, -1), layout, x, backend="triton",
                         workspace=workspace, math=math)


def blob_stacks(buffer: torch.Tensor, first: int, stride: int, count: int,
                layout: BlobLayout) -> tuple[torch.Tensor, ...]:
    """``count`` bf16 blobs of ``layout`` in ``buffer`` (uint8), the first at byte ``first``, one every
    ``stride`` bytes, as stacks: gate_up [count, 2I, H] and down [count, H, I], then the biases
    gate_up [count, 2I] and down [count, H] where the layout has them; all views of the buffer."""
    gate, up, down = (layout.part(f"{p}.weight") for p in ("gate", "up", "down"))
    if up.offset != gate.offset + gate.nbytes or stride % 2 or first % 2:
        raise ValueError("bf16 blobs must keep gate and up adjacent and lie at even offsets")
    h, i = layout.hidden_size, layout.intermediate_size
    words = buffer[first:].view(torch.bfloat16)
    stacks = [words.as_strided((count, 2 * i, h), (stride // 2, h, 1), gate.offset // 2),
              words.as_strided((count, h, i), (stride // 2, i, 1), down.offset // 2)]
    if layout.has_bias:
        stacks += [words.as_strided((count, part.shape[0]), (stride // 2, 1), part.offset // 2)
                   for part in (layout.part("gate_up.bias"), layout.part("down.bias"))]
    return tuple(stacks)


def _as_blobs(stacks: tuple[torch.Tensor, ...], device) -> tuple[torch.Tensor, torch.Tensor, BlobLayout, tuple]:
    """One layer's stacks (any device and float dtype) copied into a buffer of bf16 blobs on
    ``device`` (as a runtime's bf16 slots hold them): (buffer, table of byte offsets, layout, the
    stacks as views of the buffer). From a checkpoint's host stacks this is the only device copy
    of the layer, so loading needs no more device memory than the experts' bytes."""
    count, h, i = stacks[1].shape
    layout = blob_layout(parse_format("bf16"), h, i, bias=len(stacks) == 4)
    buffer = torch.zeros(count * layout.nbytes, dtype=torch.uint8, device=device)
    views = blob_stacks(buffer, 0, layout.nbytes, count, layout)
    for view, stack in zip(views, stacks):
        for e in range(count):  # expert by expert: a strided view would take a host stack through a device copy of it
            view[e].copy_(stack[e])
    table = torch.arange(count, dtype=torch.int64, device=device) * layout.nbytes
    return buffer, table, layout, views


class ResidentExperts:
    """Stacked expert weights per MoE layer: gate_up [E, 2I, H] and down [E, H, I], followed for
    families with biased experts (GPT-OSS) by the biases gate_up [E, 2I] and down [E, H]; they
    compute as ``math`` says (the model's family, set when the model attaches the runtime)."""

    def __init__(self, layers: dict[int, tuple[torch.Tensor, ...]], gather_decode: bool = True,
                 math: ExpertMath = SWIGLU, blobs: dict | None = None):
        self.layers = layers
        self.math = math
        self.gather_decode = gather_decode
        self.graph_safe = gather_decode  # decode never synchronises with the host: CUDA graphs record it
        # under kernels_decode: each layer's experts as bf16 blobs (the stacks become views);
        # ``blobs``: from_checkpoint's, the stacks already their views
        self._blobs: dict[int, tuple[torch.Tensor, torch.Tensor, BlobLayout]] = dict(blobs or {})
        self._workspace = None
        first = next(iter(layers.values()), None)
        if (not self._blobs and gather_decode and first is not None
                and kernels_decode(first[0].device, first[0].dtype)):
            for layer, stacks in layers.items():
                buffer, table, layout, layers[layer] = _as_blobs(stacks, stacks[0].device)
                self._blobs[layer] = (buffer, table, layout)

    @classmethod
    def from_checkpoint(cls, checkpoint, device, dtype, progress=None, gather_decode: bool = True) -> "ResidentExperts":
        """Every MoE layer's experts from ``checkpoint`` on ``device``; where the fused kernels
        decode (:func:`kernels_decode`), straight from the host into each layer's blob buffer, so
        no layer has two device copies on the way."""
        layers, blobs = {}, {}
        to_blobs = gather_decode and kernels_decode(device, dtype)
        for layer in checkpoint.config.moe_layers:
            stacks = (*checkpoint.layer_experts(layer), *(checkpoint.layer_expert_biases(layer) or ()))
            if to_blobs:
                buffer, table, layout, layers[layer] = _as_blobs(stacks, device)
                blobs[layer] = (buffer, table, layout)
            else:
                layers[layer] = tuple(t.to(device=device, dtype=dtype) for t in stacks)
            if progress is not None:
                progress.update(sum(t.nbytes for t in stacks))
        return cls(layers, gather_decode, ExpertMath.of(checkpoint.config), blobs)

    def bind(self, model) -> None:
        """Called when the model attaches this runtime: its experts compute as its family says."""
        self.math = ExpertMath.of(model.config)
        wanted = "(gate_up, down, gate_up_bias, down_bias)" if self.math.bias else "(gate_up, down)"
        if any(len(stacks) != (4 if self.math.bias else 2) for stacks in self.layers.values()):
            raise ValueError(f"{model.config.family} experts {'have' if self.math.bias else 'have no'} biases: "
                             f"give ResidentExperts {wanted} per layer")
        if self._blobs:  # scratch for the fused kernels, once (every layer decodes on one stream)
            buffer, _, layout = next(iter(self._blobs.values()))
            self._workspace = decode_workspace(layout, model.config.num_experts_per_tok, 1, buffer.device)

    @property
    def nbytes(self) -> int:
        if self._blobs:
            return sum(buffer.nbytes for buffer, _, _ in self._blobs.values())
        return sum(t.nbytes for stacks in self.layers.values() for t in stacks)

    def run_experts(self, layer, hidden, expert_ids, expert_weights):
        stacks = self.layers[layer]
        gate_up, down = stacks[:2]
        # (the blobs, unless a caller swapped this layer's stacks, as calibration does)
        if layer in self._blobs and hidden.shape[0] == 1 and gate_up.untyped_storage().data_ptr() == \
                self._blobs[layer][0].untyped_storage().data_ptr():
            buffer, table, layout = self._blobs[layer]
            return kernels_decode_experts(hidden, expert_ids[0], expert_weights[0], buffer, table, layout,
                                          self._workspace, self.math)
        if self.gather_decode and hidden.shape[0] == 1:
            return decode_experts(hidden, expert_ids[0], expert_weights[0], gate_up, down, biases=stacks[2:] or None,
                                  math=self.math)
        if grouped_mm_usable(hidden):
            return grouped_prefill(hidden, expert_ids, expert_weights, gate_up, down, stacks[2:] or None, self.math)
        return run_grouped(hidden, expert_ids, expert_weights, lambda e: tuple(t[e] for t in stacks), math=self.math)


def gathered_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, dtype: torch.dtype | None = None,
                    biases: tuple[torch.Tensor, torch.Tensor] | None = None, math: ExpertMath = SWIGLU) -> torch.Tensor:
    """One token x [1, H] through experts ``ids`` [k] of the stacks ``gate_up`` [E, 2I, H] and
    ``down`` [E, H, I] (and ``biases`` stacked alike, if the family has them): gather the k experts'
    weights (cast to ``dtype`` if given), two batched matmuls, the activation of ``math``."""
    k = ids.shape[0]
    w1, w2 = gate_up[ids], down[ids]
    if dtype is not None and w1.dtype != dtype:
        w1, w2 = w1.to(dtype), w2.to(dtype)
    h = torch.bmm(w1, x.expand(k, -1).unsqueeze(-1))  # [k, 2I, 1]
    if biases is not None:
        h = h + biases[0][ids].to(h.dtype).unsqueeze(-1)
    gate, up = h.chunk(2, dim=1)
    y = torch.bmm(w2, math.glu(gate, up)).squeeze(-1)  # [k, H]
    if biases is not None:
        y = y + biases[1][ids].to(y.dtype)
    if fused.combine_applies(y, weights):  # as the grouped decode sums
        return fused.combine(y, weights)
    return (weights.unsqueeze(-1) * y).sum(0, keepdim=True)


# CPU decode (benchmarks/cpu_decode.py), one layer step (bf16, 2 threads, Xeon with AMX), gathered ->
# looped: H1024 x I512 4.9 -> 1.4 ms, H2048 x I768 31.8 -> 4.2 ms, Mixtral's 2 x (4096 x 14336)
# 315 -> 43 ms; below ~H512 x I256 (0.98 -> 0.69 ms) the per-expert calls cost more than the copy
# (H256 x I128: 0.27 -> 0.50 ms)
LOOPED_MIN_WEIGHTS = 1 << 16  # weights of one expert projection (H x I) from which the CPU decodes looped


def looped_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, dtype: torch.dtype | None = None,
                  biases: tuple[torch.Tensor, torch.Tensor] | None = None, math: ExpertMath = SWIGLU) -> torch.Tensor:
    """:func:`gathered_decode`'s function for the CPU: one matrix-vector product per expert on its
    weights where they lie (the ids read on the host, which costs a CPU step nothing), no copy of
    the k experts' weights first. The rows are weighted and summed as the gathered decode sums
    them (timings at ``LOOPED_MIN_WEIGHTS``)."""
    rows = []
    for e in ids.tolist():
        w1, w2 = gate_up[e], down[e]
        if dtype is not None and w1.dtype != dtype:
            w1, w2 = w1.to(dtype), w2.to(dtype)
        h = F.linear(x, w1)  # [1, 2I]
        if biases is not None:
            h = h + biases[0][e].to(h.dtype)
        gate, up = h.chunk(2, dim=-1)
        y = F.linear(math.glu(gate, up), w2)  # [1, H]
        if biases is not None:
            y = y + biases[1][e].to(y.dtype)
        rows.append(y)
    return (weights.unsqueeze(-1) * torch.cat(rows)).sum(0, keepdim=True)


def decode_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, dtype: torch.dtype | None = None,
                   biases: tuple[torch.Tensor, torch.Tensor] | None = None, math: ExpertMath = SWIGLU) -> torch.Tensor:
    """One token through stacked experts (the resident stacks, or a runtime's bf16 slot stacks
    with slot ids: both go through here, so offloading stays invisible, invariant 2):
    :func:`grouped_decode` (unless ``DYMOE_RESIDENT_DECODE=gather``) where grouped GEMMs run (a GPU),
    no cast is needed and the stacks hold at most ``MAX_GROUPS`` experts, else on the CPU
    :func:`looped_decode` and on a GPU :func:`gathered_decode`
    (a runtime's pool of more slots than that decodes gathered while the resident model decodes
    grouped: two different GEMMs, which on the H100 gave the same logits bit for bit, but nothing
    promises it elsewhere)."""
    if (DECODE != "gather" and grouped_mm_usable(x) and (dtype is None or gate_up.dtype == dtype)
            and gate_up.shape[0] <= MAX_GROUPS):
        return grouped_decode(x, ids, weights, gate_up, down, biases, math)
    if x.device.type == "cpu" and down[0].numel() >= LOOPED_MIN_WEIGHTS:
        return looped_decode(x, ids, weights, gate_up, down, dtype, biases, math)
    return gathered_decode(x, ids, weights, gate_up, down, dtype, biases, math)


def grouped_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, biases: tuple[torch.Tensor, torch.Tensor] | None = None,
                   math: ExpertMath = SWIGLU) -> torch.Tensor:
    """:func:`gathered_decode`'s function with the weights read in place: the token x [1, H] as k
    rows sorted by expert through :func:`grouped_experts` (experts not in ``ids`` are empty groups),
    then the rows put back in the order of ``ids``, weighted and summed as the gathered decode sums
    them. No host synchronisation (the group ends come from a search of the sorted ids, not a
    count read back)."""
    k = ids.shape[0]
    if fused.fused_applies(x):  # the three lines below in one launch
        tokens, order, ends = fused.group_plan(x, ids, gate_up.shape[0])
    else:
        sorted_ids, order = torch.sort(ids)
        ends = torch.searchsorted(sorted_ids, _group_ids(gate_up.shape[0], ids.device), right=True, out_int32=True)
        tokens = x.expand(k, -1).contiguous()
    rows = grouped_experts(tokens, ends, gate_up, down, biases, math)
    if fused.combine_applies(rows, weights):  # one launch (the gathered decode's too)
        return fused.combine(rows, weights, order)
    return combine_rows(rows * weights[order].unsqueeze(-1), order, k)


_GROUP_IDS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _group_ids(n: int, device: torch.device) -> torch.Tensor:
    """arange(n) on ``device``, made once (one launch fewer per decoded layer), except while a CUDA
    graph is being captured: a tensor first made there holds its values only once the graph is
    replayed, so it is not kept."""
    key = (n, device)
    if key not in _GROUP_IDS:
        ids = torch.arange(n, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return ids
        _GROUP_IDS[key] = ids
    return _GROUP_IDS[key]


def grouped_prefill(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, biases: tuple[torch.Tensor, torch.Tensor] | None = None,
                    math: ExpertMath = SWIGLU) -> torch.Tensor:
    """Several tokens x [N, H] through the whole stacks in two grouped GEMMs, every expert a group
    (unused ones empty): no host synchronisation and no per-expert launches; ``biases`` stacked
    like the weights and ``math``'s activation for GPT-OSS's experts."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.bincount(flat, minlength=gate_up.shape[0]).cumsum(0).to(torch.int32)
    rows = grouped_experts(x[order // k], ends, gate_up, down, biases, math) * weights.reshape(-1)[order].unsqueeze(-1)
    return combine_rows(rows, order, k)
