"""What one routed expert computes: the single definition every expert path calls.

For an expert with ``gate_up`` [2I, H] (gate rows, then up rows), ``down`` [H, I] and, when the
family has them, biases ``gate_up_bias`` [2I] and ``down_bias`` [H]::

    gate, up = split(gate_up x + gate_up_bias)
    y = down act(gate, up) + down_bias

``act`` is SwiGLU, ``silu(gate) * up``, for every family but GPT-OSS, whose experts clamp the gate
from above and the up projection on both sides at ``limit`` and compute
``(up + 1) * gate * sigmoid(alpha * gate)`` (transformers' ``GptOssExperts._apply_gate``).
GPT-OSS checkpoints interleave gate and up columns; the checkpoint reader separates them, so every
path here sees gate rows first.

The resident stacks, the offloaded slots, the low-bit reference decode, the prefill loop and the
grouped-GEMM prefill all go through :meth:`ExpertMath.glu` (and :func:`expert_forward`); the fused
Triton decode kernels implement the same two activations (``_glu`` in
:mod:`dymoe.quant.kernels.triton_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gpt_oss")


@dataclass(frozen=True)
class ExpertMath:
    """A family's expert activation (``ModelConfig.expert_activation``), its constants, and whether
    its projections carry biases."""

    activation: str = "silu"
    bias: bool = False
    limit: float = 7.0  # gpt_oss: clamp of gate (above) and up (both sides)
    alpha: float = 1.702  # gpt_oss: sigmoid gain

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown expert activation {self.activation!r} (known: {', '.join(ACTIVATIONS)})")

    @classmethod
    def of(cls, config) -> "ExpertMath":
        """The expert math of a :class:`~dymoe.models.config.ModelConfig`."""
        return cls(config.expert_activation, config.expert_bias, config.swiglu_limit, config.swiglu_alpha)

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The gated activation of the gate and up projections (same shapes), elementwise."""
        if self.activation == "silu":
            return F.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SWIGLU = ExpertMath()


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
                   down_bias: torch.Tensor | None = None, math: ExpertMath = SWIGLU) -> torch.Tensor:
    """Tokens x [N, H] through one expert (see the module docstring); returns [N, H]."""
    gate, up = F.linear(x, gate_up, gate_up_bias).chunk(2, dim=-1)
    return F.linear(math.glu(gate, up), down, down_bias)
