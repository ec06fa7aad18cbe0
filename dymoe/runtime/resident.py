"""ResidentExperts: every routed expert kept in device memory at the checkpoint's precision.

It is the `resident` preset (the upper bound when everything fits) and the reference the
offloading runtimes are checked against (invariant 2 of DESIGN.md).
"""

from __future__ import annotations

import torch

from dymoe.runtime.expert_compute import run_grouped


class ResidentExperts:
    """Stacked expert weights per MoE layer: gate_up [E, 2I, H] and down [E, H, I]."""

    def __init__(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.layers = layers

    @classmethod
    def from_checkpoint(cls, checkpoint, device, dtype, progress=None) -> "ResidentExperts":
        layers = {}
        for layer in checkpoint.config.moe_layers:
            gate_up, down = checkpoint.layer_experts(layer)
            layers[layer] = (gate_up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype))
            if progress is not None:
                progress.update(gate_up.nbytes + down.nbytes)
        return cls(layers)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.layers.values())

    def run_experts(self, layer, hidden, expert_ids, expert_weights):
        gate_up, down = self.layers[layer]
        return run_grouped(hidden, expert_ids, expert_weights, lambda e: (gate_up[e], down[e]))
