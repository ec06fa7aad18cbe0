"""DyMoE's depth-adaptive schedule: which MoE layers are too sensitive to run at low precision.

For each MoE layer in turn, only that layer's routed experts are replaced by their low-bit copies
(quantized and dequantized in memory, every other layer exact), and the model reads a calibration
text; the layer's sensitivity is the mean KL divergence of the next-token distribution from the
exact model's. The most sensitive layers become the schedule's critical layers: the `dymoe` preset
never runs them below the high precision. DyMoE reports that such sensitivity is depth-dependent and
often highest at the first and last layers, which is the preset's default when no schedule is given.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dymoe.errors import InputError
from dymoe.quant.formats import parse_format
from dymoe.quant.reference import dequantize, quantize
from dymoe.runtime.resident import ResidentExperts

SCHEDULE_VERSION = 1


@dataclass(frozen=True)
class Schedule:
    """Per-MoE-layer sensitivity and the critical layers (indices into the model's MoE layers)."""

    low_precision: str
    sensitivity: dict[int, float]  # MoE layer index (model layer number) -> mean KL
    critical_layers: tuple[int, ...]  # positions in the list of MoE layers, as OffloadConfig takes them

    def save(self, path: Path) -> None:
        data = {"version": SCHEDULE_VERSION, "low_precision": self.low_precision,
                "sensitivity": {str(k): v for k, v in self.sensitivity.items()},
                "critical_layers": list(self.critical_layers)}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Schedule":
        try:
            data = json.loads(Path(path).read_text())
            if data.get("version") != SCHEDULE_VERSION:
                raise ValueError(f"version {data.get('version')}")
            return cls(data["low_precision"], {int(k): float(v) for k, v in data["sensitivity"].items()},
                       tuple(int(i) for i in data["critical_layers"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"--schedule {path} is not a dymoe schedule ({exc}); write one with `dymoe calibrate`") from None


def low_bit_stacks(gate_up: torch.Tensor, down: torch.Tensor, precision: str, group_size: int):
    """A layer's expert stacks with every matrix replaced by its quantized-then-dequantized copy."""
    fmt = parse_format(precision, group_size)

    def roundtrip(w):
        return dequantize(quantize(w, fmt), w.dtype)

    return (torch.stack([roundtrip(w) for w in gate_up]), torch.stack([roundtrip(w) for w in down]))


def mean_kl(model, ids: torch.Tensor, reference: torch.Tensor) -> float:
    logits = model(ids.view(1, -1), 0, model.new_cache(1))[0].float().log_softmax(-1)
    return float((reference.exp() * (reference - logits)).sum(-1).mean())


def calibrate(model, experts: ResidentExperts, ids: list[int], low_precision: str = "int4",
              group_size: int = 128, critical: int = 2, progress=None) -> Schedule:
    """Measure each MoE layer's sensitivity to ``low_precision`` on ``ids`` and pick the ``critical``
    most sensitive layers. ``model`` must have ``experts`` attached (all resident)."""
    if len(ids) < 2:
        raise InputError("the calibration text is too short: give at least a sentence")
    tokens = torch.tensor(ids[: model.context_len], device=model.lm_head.weight.device)
    reference = model(tokens.view(1, -1), 0, model.new_cache(1))[0].float().log_softmax(-1)
    layers = sorted(experts.layers)
    sensitivity = {}
    for layer in layers:
        exact = experts.layers[layer]
        # biases (GPT-OSS) stay as they are: the store keeps them unquantized at every precision
        experts.layers[layer] = (*low_bit_stacks(*exact[:2], low_precision, group_size), *exact[2:])
        try:
            sensitivity[layer] = mean_kl(model, tokens, reference)
        finally:
            experts.layers[layer] = exact
        if progress is not None:
            progress(layer, sensitivity[layer])
    ranked = sorted(range(len(layers)), key=lambda i: -sensitivity[layers[i]])
    return Schedule(low_precision, sensitivity, tuple(sorted(ranked[:critical])))
