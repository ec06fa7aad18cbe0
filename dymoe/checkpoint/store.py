"""The multi-precision expert store: reading it (open, blob views, checksums).

A store is a folder with a few large data files and one ``index.json``. Every routed expert of every
MoE layer is held in each of the store's precisions as one blob (layout: :mod:`dymoe.checkpoint.blob`)
starting at a 4096-byte aligned offset of a data file. Data files are named
``<precision>[-g<group>][-hqq]-layers<first>-<last>.bin`` and hold consecutive MoE layers of one
precision, at most about :data:`FILE_TARGET_BYTES` each.

``index.json`` (written last, atomically, by :func:`dymoe.checkpoint.convert.convert_store`; its
presence means the store is complete)::

    {"format_version": 1,
     "fingerprint": "<hash of config.json, shard names and sizes, expert shapes>",
     "source": "<model folder it was converted from>",
     "model": {"family", "hidden_size", "moe_intermediate_size", "num_experts", "moe_layers"},
     "precisions": {"int4": {"layout": <BlobLayout.to_json()>,
                             "files": {"int4-g128-layers000-047.bin": <size in bytes>},
                             "experts": {"<layer>": [[file, offset, nbytes, crc32], ... per expert]}}}}

Data files are memory-mapped read only: :meth:`ExpertStore.blob` returns a zero-copy view, and
writing into one crashes the process (the runtime copies blobs into its own buffers).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dymoe.checkpoint.blob import BLOB_ALIGN, BlobLayout, unpack_expert  # noqa: F401  (unpack_expert is public here)
from dymoe.errors import StoreError

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
FILE_TARGET_BYTES = 4 << 30  # keeps every file mappable and copyable on FAT-like filesystems


@dataclass(frozen=True)
class BlobEntry:
    """Where one (layer, expert, precision) blob lies and its crc32."""

    file: str
    offset: int
    nbytes: int
    crc32: int


def default_store_dir(model_dir: str | Path) -> Path:
    """Where a model's store lives unless told otherwise: ``MODEL_DIR/dymoe-store`` when the model
    folder is writable (the store then travels and is deleted with the model), else
    ``~/.cache/dymoe/stores/<folder name>-<hash of its absolute path>``."""
    model_dir = Path(model_dir).expanduser()
    if os.access(model_dir, os.W_OK):
        return model_dir / "dymoe-store"
    tag = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "dymoe" / "stores" / f"{model_dir.resolve().name}-{tag}"


def model_fingerprint(checkpoint) -> str:
    """A short hash that changes when the checkpoint's config, shard files or expert shapes do.

    Reads only ``checkpoint.path`` and ``checkpoint.config`` (shard sizes, not contents), so it is
    instant; a re-downloaded or different model gets a different fingerprint and a stale store is
    detected at open.
    """
    c = checkpoint.config
    h = hashlib.sha256()
    path = Path(checkpoint.path)
    config_json = path / "config.json"
    if config_json.is_file():
        h.update(config_json.read_bytes())
    for shard in sorted(path.glob("*.safetensors")):
        h.update(f"{shard.name}:{shard.stat().st_size};".encode())
    h.update(json.dumps(model_summary(c), sort_keys=True).encode())
    return h.hexdigest()[:16]


def model_summary(config) -> dict:
    """The expert shapes a store depends on, kept in the index for messages and checks."""
    return {"family": config.family, "hidden_size": config.hidden_size,
            "moe_intermediate_size": config.moe_intermediate_size, "num_experts": config.num_experts,
            "moe_layers": list(config.moe_layers)}


def blob_crc32(blob: torch.Tensor) -> int:
    return zlib.crc32(blob.numpy())


def read_index(path: Path) -> dict:
    """The parsed ``index.json`` of the store at ``path``; :class:`StoreError` if absent or unreadable."""
    index = path / INDEX_FILE
    if not path.is_dir():
        raise StoreError(f"no expert store at {path}: create one with `dymoe convert MODEL_DIR --out {path}`")
    if not index.is_file():
        what = "is incomplete (an interrupted convert?)" if any(path.glob("*.bin*")) else "has no index.json"
        raise StoreError(f"expert store {path} {what}: re-run `dymoe convert MODEL_DIR --out {path}`")
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{index} is unreadable ({exc}): re-run `dymoe convert MODEL_DIR --out {path}`") from None
    if not isinstance(data, dict):
        raise StoreError(f"{index} is not a dymoe store index: re-run `dymoe convert MODEL_DIR --out {path}`")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{index} has store format version {version}, this dymoe reads version {FORMAT_VERSION}: "
                         f"{convert_hint(data, path)}")
    return data


def convert_hint(index: dict, path: Path) -> str:
    return f"re-run `dymoe convert {index.get('source', 'MODEL_DIR')} --out {path}`"


class ExpertStore:
    """An opened expert store: typed layouts and zero-copy blob views over memory-mapped files."""

    def __init__(self, path: Path, index: dict, files: dict[str, torch.Tensor]):
        self.path = path
        self.fingerprint: str = index["fingerprint"]
        self.source: str = index.get("source", "MODEL_DIR")
        self.model: dict = index["model"]
        self._files = files
        self._layouts = {p: BlobLayout.from_json(rec["layout"]) for p, rec in index["precisions"].items()}
        self._entries = {p: {int(layer): [BlobEntry(*e) for e in entries] for layer, entries in rec["experts"].items()}
                         for p, rec in index["precisions"].items()}

    @classmethod
    def open(cls, path: str | Path, checkpoint=None) -> "ExpertStore":
        """Open the store at ``path``, checking its format version, completeness and file sizes, and
        (when ``checkpoint`` is given) that it was built from that checkpoint."""
        path = Path(path).expanduser()
        index = read_index(path)
        if checkpoint is not None and index["fingerprint"] != model_fingerprint(checkpoint):
            raise StoreError(f"expert store {path} was built from another model ({index.get('source')}) or an "
                             f"older copy of it, not {checkpoint.path}: "
                             f"re-run `dymoe convert {checkpoint.path} --out {path}`")
        try:
            check_complete(index, path)
            files = {name: _map_file(path / name, size, index)
                     for rec in index["precisions"].values() for name, size in rec["files"].items()}
            return cls(path, index, files)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise StoreError(f"{path / INDEX_FILE} is malformed ({type(exc).__name__}: {exc}): "
                             f"{convert_hint(index, path)}") from None

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self._layouts)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.model["moe_layers"])

    @property
    def num_experts(self) -> int:
        return self.model["num_experts"]

    def layout(self, precision: str) -> BlobLayout:
        """Part offsets, shapes and dtypes shared by every blob of ``precision``."""
        if precision not in self._layouts:
            raise StoreError(f"expert store {self.path} has no {precision} copies (it has "
                             f"{', '.join(self.precisions)}): run `dymoe convert {self.source} --out {self.path} "
                             f"--precisions {','.join((*self.precisions, precision))}` to add them")
        return self._layouts[precision]

    def entry(self, layer: int, expert: int, precision: str) -> BlobEntry:
        self.layout(precision)
        experts = self._entries[precision].get(layer)
        if experts is None or not 0 <= expert < len(experts):
            raise StoreError(f"expert store {self.path} has no expert {expert} in layer {layer} (MoE layers "
                             f"{list(self.layers)}, {self.num_experts} experts each)")
        return experts[expert]

    def blob(self, layer: int, expert: int, precision: str) -> torch.Tensor:
        """The blob of one expert at one precision: a zero-copy, read-only 1-D uint8 view."""
        e = self.entry(layer, expert, precision)
        return self._files[e.file][e.offset:e.offset + e.nbytes]

    def verify(self, layer: int, expert: int, precision: str) -> None:
        """Recompute one blob's crc32; :class:`StoreError` naming the file and offset on a mismatch."""
        e = self.entry(layer, expert, precision)
        if blob_crc32(self.blob(layer, expert, precision)) != e.crc32:
            raise StoreError(f"{self.path / e.file} is corrupted: the {precision} copy of layer {layer} expert "
                             f"{expert} (bytes {e.offset}..{e.offset + e.nbytes}) fails its checksum; "
                             f"{convert_hint({'source': self.source}, self.path)}")

    def verify_all(self, progress: bool = False) -> None:
        """Check every blob's checksum (reads the whole store once)."""
        keys = [(layer, expert, p)
                for p in self.precisions for layer in self.layers for expert in range(self.num_experts)]
        for key in tqdm(keys, desc="verify", unit="expert", disable=not progress):
            self.verify(*key)

    def unpack(self, layer: int, expert: int, precision: str, dtype: torch.dtype = torch.bfloat16):
        """Dequantized (gate [I, H], up [I, H], down [H, I]) of one expert, for tests and the CPU path."""
        return unpack_expert(self.blob(layer, expert, precision), self.layout(precision), dtype)

    def nbytes(self, precision: str | None = None) -> int:
        """Bytes of the data files of ``precision`` (all precisions when None)."""
        return sum(t.numel() for name, t in self._files.items()
                   if precision is None or name.startswith(precision + "-"))


def check_complete(index: dict, path: Path) -> None:
    """Every precision must list every expert of every MoE layer, each blob inside its file; an index
    is only written complete, so a gap means it was edited or belongs to a different dymoe."""
    layers = {str(layer) for layer in index["model"]["moe_layers"]}
    for precision, rec in index["precisions"].items():
        experts, sizes, blob_bytes = rec["experts"], rec["files"], rec["layout"]["nbytes"]
        complete = set(experts) == layers and all(len(v) == index["model"]["num_experts"] for v in experts.values())
        inside = all(e[0] in sizes and e[2] == blob_bytes and e[1] % BLOB_ALIGN == 0 and e[1] + e[2] <= sizes[e[0]]
                     for v in experts.values() for e in v)
        if not (complete and inside):
            raise StoreError(f"{path / INDEX_FILE} lists an incomplete or inconsistent set of {precision} experts: "
                             f"{convert_hint(index, path)}")


def _map_file(file: Path, size: int, index: dict) -> torch.Tensor:
    """Memory-map ``file`` read-only as a uint8 tensor after checking its size against the index."""
    if not file.is_file():
        raise StoreError(f"{file} is missing from the expert store: {convert_hint(index, file.parent)}")
    actual = file.stat().st_size
    if actual != size:
        raise StoreError(f"{file} is truncated or damaged: it has {actual} bytes, the index expects {size}; "
                         f"{convert_hint(index, file.parent)}")
    with file.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        # A read-only mapping is the point (no private copy-on-write commit of a 50 GB store).
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapped, dtype=torch.uint8)
