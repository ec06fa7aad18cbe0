"""ResidentExperts: every routed expert kept in device memory at the checkpoint's precision.

It is the `resident` preset (the upper bound when everything fits) and the reference the
offloading runtimes are checked against (invariant 2 of DESIGN.md).

Two paths compute the same function. Prefill groups tokens by expert (one matmul pair per expert
used). Decode (one token) gathers the k chosen experts' weights by index and runs two batched
matmuls: no device-to-host synchronisation, so the host can queue the next layers while the GPU
works (measured on an H100: see docs/benchmarks-resident.md). The decode path sums the k expert
outputs in another order than the grouped path, so the two agree to float rounding, not bit for
bit; ``gather_decode=False`` keeps the grouped path everywhere (the bit-exact reference the
offloading runtimes are compared with).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dymoe.runtime.expert_compute import grouped_mm_usable, grouped_swiglu, run_grouped


class ResidentExperts:
    """Stacked expert weights per MoE layer: gate_up [E, 2I, H] and down [E, H, I]."""

    def __init__(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor]], gather_decode: bool = True):
        self.layers = layers
        self.gather_decode = gather_decode
        self.graph_safe = gather_decode  # decode never synchronises with the host: CUDA graphs record it

    @classmethod
    def from_checkpoint(cls, checkpoint, device, dtype, progress=None, gather_decode: bool = True) -> "ResidentExperts":
        layers = {}
        for layer in checkpoint.config.moe_layers:
            gate_up, down = checkpoint.layer_experts(layer)
            layers[layer] = (gate_up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype))
            if progress is not None:
                progress.update(gate_up.nbytes + down.nbytes)
        return cls(layers, gather_decode)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.layers.values())

    def run_experts(self, layer, hidden, expert_ids, expert_weights):
        gate_up, down = self.layers[layer]
        if self.gather_decode and hidden.shape[0] == 1:
            return gathered_decode(hidden, expert_ids[0], expert_weights[0], gate_up, down)
        if grouped_mm_usable(hidden):
            return grouped_prefill(hidden, expert_ids, expert_weights, gate_up, down)
        return run_grouped(hidden, expert_ids, expert_weights, lambda e: (gate_up[e], down[e]))


def gathered_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    gate_up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One token x [1, H] through experts ``ids`` [k] of the stacks ``gate_up`` [E, 2I, H] and
    ``down`` [E, H, I]: gather the k experts' weights (cast to ``dtype`` if given), two batched matmuls."""
    k = ids.shape[0]
    w1, w2 = gate_up[ids], down[ids]
    if dtype is not None and w1.dtype != dtype:
        w1, w2 = w1.to(dtype), w2.to(dtype)
    h = torch.bmm(w1, x.expand(k, -1).unsqueeze(-1))  # [k, 2I, 1]
    gate, up = h.chunk(2, dim=1)
    y = torch.bmm(w2, F.silu(gate) * up).squeeze(-1)  # [k, H]
    return (weights.unsqueeze(-1) * y).sum(0, keepdim=True)


def grouped_prefill(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """Several tokens x [N, H] through the whole stacks in two grouped GEMMs, every expert a group
    (unused ones empty): no host synchronisation and no per-expert launches."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.bincount(flat, minlength=gate_up.shape[0]).cumsum(0).to(torch.int32)
    tokens = order // k
    rows = grouped_swiglu(x[tokens], ends, gate_up, down) * weights.reshape(-1)[order].unsqueeze(-1)
    return torch.zeros_like(x).index_add_(0, tokens, rows)
