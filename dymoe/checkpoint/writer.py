"""Writing a Hugging Face-format checkpoint folder (config.json + model.safetensors), atomically.

Used for the demo model and for tests; files go to a temporary name first and are renamed into
place, so an interrupted write never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_checkpoint(path: Path, raw_config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` and ``raw_config`` as a one-shard checkpoint in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / "model.safetensors")
    write_atomic(path / "config.json", json.dumps(raw_config, indent=2) + "\n")
    return path
