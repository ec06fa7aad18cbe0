"""Reading Hugging Face checkpoint folders: config.json plus one or many safetensors shards.

`Checkpoint` finds every tensor by name across shards (through ``model.safetensors.index.json``
when present), checks shapes against what the model expects, and reads routed experts one at a
time in either of the two layouts published on the hub: one tensor per expert and projection
(``mlp.experts.E.gate_proj.weight``, Mixtral's ``w1/w3/w2``) or the fused 3-D layout
(``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]).

GPT-OSS's fused experts differ in three ways, all undone here so the rest of dymoe sees the usual
[out, in] weights with gate rows before up rows: its bf16 tensors are stored [E, in, out]
(``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]), gate and up alternate along 2I, and each
projection has a bias (``gate_up_proj_bias`` [E, 2I], ``down_proj_bias`` [E, H]). Its published
release stores the expert weights as MXFP4 (``gate_up_proj_blocks``/``_scales`` [E, 2I, H/32, ...],
[out, in] order), dequantized to bf16 as they are read (:mod:`dymoe.quant.mxfp4`).
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
from dymoe.quant.mxfp4 import dequantize_mxfp4

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
    fused_gate_up_bias: str = "experts.gate_up_proj_bias"  # families with biased experts (GPT-OSS)
    fused_down_bias: str = "experts.down_proj_bias"
    fused_in_out: bool = False  # bf16 fused tensors stored [E, in, out] (needed when H == I makes it ambiguous)
    interleaved_gate_up: bool = False  # gate and up alternate along the 2I dimension
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
        first = config.moe_layers[0] if config.moe_layers else None
        self.mxfp4 = first is not None and self._block(first, self.names.fused_gate_up + "_blocks") in tensor_files
        self.fused_experts = first is not None and (
            self.mxfp4 or self._block(first, self.names.fused_gate_up) in tensor_files
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
        """(gate [I, H], up [I, H], down [H, I]) of one routed expert, in the checkpoint dtype (bf16
        for MXFP4 experts)."""
        c = self.config
        h, i = c.hidden_size, c.moe_intermediate_size
        if self.fused_experts:
            gate_up = self._fused_expert(layer, self.names.fused_gate_up, expert, 2 * i, h)
            down = self._fused_expert(layer, self.names.fused_down, expert, h, i)
            return (*self._split_gate_up(gate_up, dim=0), down)
        return (
            self.get(self._block(layer, self.names.gate.format(e=expert)), (i, h)),
            self.get(self._block(layer, self.names.up.format(e=expert)), (i, h)),
            self.get(self._block(layer, self.names.down.format(e=expert)), (h, i)),
        )

    def expert_biases(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up bias [2I], gate part first; down bias [H]) of one routed expert; None for
        families whose experts have no biases."""
        biases = self.layer_expert_biases(layer)
        return None if biases is None else (biases[0][expert], biases[1][expert])

    def layer_expert_biases(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every expert's biases of a layer stacked: gate_up [E, 2I] (gate part first) and down [E, H]."""
        c = self.config
        if not c.expert_bias:
            return None
        e, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        gate_up = self.get(self._block(layer, self.names.fused_gate_up_bias), (e, 2 * i))
        down = self.get(self._block(layer, self.names.fused_down_bias), (e, h))
        return torch.cat(self._split_gate_up(gate_up, dim=1), dim=1), down

    def _split_gate_up(self, gate_up: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up halves of a fused gate_up along ``dim`` (interleaved for GPT-OSS)."""
        if self.names.interleaved_gate_up:
            return gate_up.unflatten(dim, (gate_up.shape[dim] // 2, 2)).unbind(dim + 1)
        return gate_up.chunk(2, dim=dim)

    def _fused_expert(self, layer: int, suffix: str, expert: int, rows: int, cols: int) -> torch.Tensor:
        """One expert's [rows, cols] (out, in) weight from a fused tensor, reading only its slice:
        MXFP4 blocks and scales dequantized to bf16, or an [E, out, in] or [E, in, out] tensor."""
        name = self._block(layer, suffix)
        e = self.config.num_experts
        if self.mxfp4:
            blocks = self._expert_slice(name + "_blocks", expert, (e, rows, cols // 32, 16))
            scales = self._expert_slice(name + "_scales", expert, (e, rows, cols // 32))
            return dequantize_mxfp4(blocks, scales)
        if self._stored_in_out(name, rows, cols):
            return self._expert_slice(name, expert, (e, cols, rows)).T
        return self._expert_slice(name, expert, (e, rows, cols))

    def _fused_layer(self, layer: int, suffix: str, rows: int, cols: int) -> torch.Tensor:
        """A whole fused (bf16) tensor as a contiguous [E, rows, cols] (out, in): the resident
        stacks must be laid out as the store's slots are, or matmuls round differently."""
        name = self._block(layer, suffix)
        e = self.config.num_experts
        if self._stored_in_out(name, rows, cols):
            return self.get(name, (e, cols, rows)).transpose(1, 2).contiguous()
        return self.get(name, (e, rows, cols))

    def _stored_in_out(self, name: str, rows: int, cols: int) -> bool:
        """Whether the fused tensor is stored [E, in, out]: transformers 5 keeps [E, out, in], some
        exports and GPT-OSS the other way (declared for it: its H == I makes the shape ambiguous)."""
        actual = self.shape(name)[1:]
        return actual == (cols, rows) and (self.names.fused_in_out or actual != (rows, cols))

    def _expert_slice(self, name: str, expert: int, shape: tuple) -> torch.Tensor:
        """Row ``expert`` of the fused tensor ``name``, whose shape must be ``shape``."""
        handle = self._handle(name)
        actual = tuple(handle.get_slice(name).get_shape())
        if actual != tuple(shape):
            self.get(name, shape)  # raises the shape error naming the file
        try:
            return handle.get_slice(name)[expert]
        except Exception as exc:  # safetensors raises its own error types for short reads
            raise CheckpointError(f"cannot read tensor {name} from {self._tensor_files[name]}: {exc}") from None

    def layer_experts(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts of a layer stacked: gate_up [E, 2I, H] (gate rows, then up rows) and down [E, H, I]."""
        c = self.config
        h, i = c.hidden_size, c.moe_intermediate_size
        if self.fused_experts and not self.mxfp4:  # MXFP4 is dequantized an expert at a time (memory)
            gate_up = self._fused_layer(layer, self.names.fused_gate_up, 2 * i, h)
            if self.names.interleaved_gate_up:
                gate_up = torch.cat(self._split_gate_up(gate_up, dim=1), dim=1)
            return gate_up, self._fused_layer(layer, self.names.fused_down, h, i)
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


GPT_OSS_NAMES = ExpertNames(router="router", fused_in_out=True, interleaved_gate_up=True)
PHIMOE_FUSED_NAMES = ExpertNames(router="router")


def _detect_names(config: ModelConfig, tensor_files: dict[str, Path]) -> ExpertNames:
    """Mixtral's and Phi-MoE's hub checkpoints say ``block_sparse_moe`` and ``w1/w3/w2``; their
    fused exports (as transformers 5 holds them in memory) say ``mlp`` like the other families, and
    Phi-MoE's calls its router ``mlp.router``. DeepSeek names its shared experts ``mlp.shared_experts``."""
    if config.family.startswith("deepseek"):
        return DEEPSEEK_NAMES
    if config.family == "gpt_oss":
        return GPT_OSS_NAMES
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
