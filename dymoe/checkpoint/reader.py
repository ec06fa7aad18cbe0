"""Reading Hugging Face checkpoint folders: config.json plus one or many safetensors shards.

`Checkpoint` finds every tensor by name across shards (through ``model.safetensors.index.json``
when present), checks shapes against what the model expects, and reads routed experts one at a
time in either of the two layouts published on the hub: one tensor per expert and projection
(``mlp.experts.E.gate_proj.weight``, Mixtral's ``w1/w3/w2``) or the fused 3-D layout
(``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from dymoe.errors import CheckpointError
from dymoe.models.config import ModelConfig
from dymoe.models.registry import parse_config

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class ExpertNames:
    """Where one family keeps its routed experts (``{l}`` = layer, ``{e}`` = expert)."""

    block: str = "model.layers.{l}.mlp"
    gate: str = "experts.{e}.gate_proj.weight"
    up: str = "experts.{e}.up_proj.weight"
    down: str = "experts.{e}.down_proj.weight"
    fused_gate_up: str = "experts.gate_up_proj"
    fused_down: str = "experts.down_proj"
    shared: str = "shared_expert"  # the always-on shared expert(s), dense and resident
    router: str = "gate"  # the router's module under the block


def _check_header(path: Path) -> None:
    """Fail early with a clear message on a truncated or non-safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes): download it again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file: download it again")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header: download it again") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + header_len + data_end} bytes but the file "
            f"has {size}; download it again"
        )


class Checkpoint:
    """A Hugging Face MoE checkpoint folder, opened lazily (tensors are read on demand)."""

    def __init__(self, path: Path, config: ModelConfig, raw_config: dict, tensor_files: dict[str, Path]):
        self.path = path
        self.config = config
        self.raw_config = raw_config
        self._tensor_files = tensor_files
        self._handles: dict[Path, object] = {}
        self.names = _detect_names(config, tensor_files)
        self.fused_experts = bool(config.moe_layers) and (
            self._block(config.moe_layers[0], self.names.fused_gate_up) in tensor_files
        )

    @classmethod
    def open(cls, model_dir: str | Path) -> "Checkpoint":
        """Open ``model_dir``; raise :class:`CheckpointError` naming what is missing or broken."""
        path = Path(model_dir).expanduser()
        if not path.exists():
            raise CheckpointError(f"model folder {path} does not exist: pass the folder holding config.json")
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a folder: pass the folder holding config.json")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path} has no config.json: is it a Hugging Face checkpoint folder?")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON ({exc})") from None
        config = parse_config(raw, source=config_path)
        return cls(path, config, raw, _tensor_files(path))

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self._tensor_files)

    @property
    def files(self) -> list[Path]:
        """The safetensors shards, each once."""
        return sorted(set(self._tensor_files.values()))

    # ---- tensors -----------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self._tensor_files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read tensor ``name``; if ``shape`` is given, check it and name the file on mismatch."""
        handle = self._handle(name)
        if shape is not None:
            actual = tuple(handle.get_slice(name).get_shape())
            if actual != tuple(shape):
                raise CheckpointError(
                    f"tensor {name} in {self._tensor_files[name].name} has shape {list(actual)}, "
                    f"expected {list(shape)} from config.json: the checkpoint and its config do not match"
                )
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for short reads
            raise CheckpointError(f"cannot read tensor {name} from {self._tensor_files[name]}: {exc}") from None

    def _handle(self, name: str):
        file = self._tensor_files.get(name)
        if file is None:
            where = INDEX_FILE if (self.path / INDEX_FILE).exists() else "the safetensors files"
            raise CheckpointError(f"tensor {name} is missing from {where} in {self.path}")
        if file not in self._handles:
            _check_header(file)
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    # ---- experts -----------------------------------------------------------------------------

    def tensor_name(self, param_name: str) -> str:
        """The checkpoint's name for one of our (Hugging Face-named) dense parameters."""
        if self.names.shared != ExpertNames.shared:
            param_name = param_name.replace(f".mlp.{ExpertNames.shared}.", f".mlp.{self.names.shared}.")
        if self.names.router != ExpertNames.router:
            param_name = param_name.replace(f".mlp.{ExpertNames.router}.", f".mlp.{self.names.router}.")
        default = ExpertNames.block.split("{")[0]
        if self.names.block != ExpertNames.block and param_name.startswith(default):
            layer = param_name[len(default):].split(".")[0]
            prefix = f"{default}{layer}.mlp."
            if param_name.startswith(prefix):
                return self.names.block.format(l=layer) + "." + param_name[len(prefix):]
        return param_name

    def _block(self, layer: int, suffix: str) -> str:
        return self.names.block.format(l=layer) + "." + suffix

    def expert_weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, H], up [I, H], down [H, I]) of one routed expert, in the checkpoint dtype."""
        c = self.config
        h, i, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
        if self.fused_experts:
            gate_up = self._fused(layer, self.names.fused_gate_up, (e, 2 * i, h), (e, h, 2 * i))[expert]
            down = self._fused(layer, self.names.fused_down, (e, h, i), (e, i, h))[expert]
            return gate_up[:i], gate_up[i:], down
        return (
            self.get(self._block(layer, self.names.gate.format(e=expert)), (i, h)),
            self.get(self._block(layer, self.names.up.format(e=expert)), (i, h)),
            self.get(self._block(layer, self.names.down.format(e=expert)), (h, i)),
        )

    def _fused(self, layer: int, suffix: str, shape: tuple, transposed: tuple) -> torch.Tensor:
        """A fused expert tensor in the [E, out, in] orientation (transformers 5 keeps that one;
        some exports store [E, in, out], which is transposed here)."""
        name = self._block(layer, suffix)
        actual = self.shape(name)
        if actual == shape:
            return self.get(name)
        if actual == transposed:
            return self.get(name).transpose(1, 2)
        return self.get(name, shape)  # raises the shape error

    def layer_experts(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts of a layer stacked: gate_up [E, 2I, H] and down [E, H, I]."""
        c = self.config
        if self.fused_experts:
            h, i, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
            return (
                self._fused(layer, self.names.fused_gate_up, (e, 2 * i, h), (e, h, 2 * i)),
                self._fused(layer, self.names.fused_down, (e, h, i), (e, i, h)),
            )
        parts = [self.expert_weights(layer, e) for e in range(c.num_experts)]
        gate_up = torch.stack([torch.cat([g, u], dim=0) for g, u, _ in parts])
        down = torch.stack([d for _, _, d in parts])
        return gate_up, down


MIXTRAL_NAMES = ExpertNames(
    block="model.layers.{l}.block_sparse_moe",
    gate="experts.{e}.w1.weight",
    up="experts.{e}.w3.weight",
    down="experts.{e}.w2.weight",
)


DEEPSEEK_NAMES = ExpertNames(shared="shared_experts")
PHIMOE_FUSED_NAMES = ExpertNames(router="router")


def _detect_names(config: ModelConfig, tensor_files: dict[str, Path]) -> ExpertNames:
    """Mixtral's and Phi-MoE's hub checkpoints say ``block_sparse_moe`` and ``w1/w3/w2``; their
    fused exports (as transformers 5 holds them in memory) say ``mlp`` like the other families, and
    Phi-MoE's calls its router ``mlp.router``. DeepSeek names its shared experts ``mlp.shared_experts``."""
    if config.family.startswith("deepseek"):
        return DEEPSEEK_NAMES
    if config.family in ("mixtral", "phimoe") and config.moe_layers:
        router = MIXTRAL_NAMES.block.format(l=config.moe_layers[0]) + ".gate.weight"
        if router in tensor_files:
            return MIXTRAL_NAMES
    if config.family == "phimoe":
        return PHIMOE_FUSED_NAMES
    return ExpertNames()


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the shard holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        files = {}
        for name, shard in weight_map.items():
            shard_path = path / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{shard_path} is listed in {INDEX_FILE} but missing: download it again")
            files[name] = shard_path
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path} has no *.safetensors files (dymoe does not read .bin/.pt checkpoints)")
    files = {}
    for shard in shards:
        _check_header(shard)
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                files[name] = shard
    return files
