"""Writing the multi-precision expert store (``dymoe convert``); its format is in :mod:`dymoe.checkpoint.store`.

Crash safety: data files are written under ``<name>.tmp`` and renamed when complete; ``index.json``
is written last (temp + fsync + rename), so an interrupted convert never leaves a store that opens.

Re-running convert on an existing store of the same model *adds*: precisions already present with
the same format (group size, rounding) and intact file sizes are kept as they are, missing ones are
built, and ones present with another group size or rounding are rebuilt and their old files removed
after the new index is in place. If nothing is missing it returns at once. A store of a different
model (or of an older download of this one, see :func:`model_fingerprint`) is rebuilt from scratch.
It never removes a precision that was not asked for.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from dymoe.checkpoint.blob import BlobLayout, blob_layout, encode_expert
from dymoe.checkpoint.store import (
    FILE_TARGET_BYTES, FORMAT_VERSION, INDEX_FILE, blob_crc32, check_complete, model_fingerprint, model_summary,
    read_index,
)
from dymoe.errors import CheckpointError, StoreError
from dymoe.quant.formats import QuantFormat, parse_format


def convert_store(checkpoint, out_dir: str | Path, precisions=("bf16", "int4"), group_size: int = 128,
                  rounding: str = "nearest", progress: bool = True) -> Path:
    """Write every routed expert of ``checkpoint`` in each of ``precisions`` into the store ``out_dir``.

    ``checkpoint`` needs only ``.config``, ``.path`` and ``.expert_weights(layer, expert)`` (and
    ``.expert_biases(layer, expert)`` for families with biased experts).
    ``group_size`` applies to int4/int3/int2; ``rounding`` is "nearest" or "hqq" (slower, lower
    error). Returns the store folder. See the module docstring for what an existing store becomes.
    """
    out = Path(out_dir).expanduser()
    layouts = _layouts(checkpoint.config, precisions, group_size, rounding)
    fingerprint = model_fingerprint(checkpoint)
    previous = _previous_index(out)
    old = previous if previous and previous.get("fingerprint") == fingerprint else None
    todo = {p: lay for p, lay in layouts.items() if not _satisfied(old, out, p, lay)}
    if not todo:
        _say(progress, f"expert store {out} already holds {', '.join(layouts)} for this model: nothing to do")
        return out
    _prepare(out, old)
    records = _write_precisions(checkpoint, out, todo, progress)
    kept = {p: rec for p, rec in (old or {}).get("precisions", {}).items() if p not in todo}
    index = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "source": str(checkpoint.path),
             "model": model_summary(checkpoint.config), "precisions": {**kept, **records}}
    _write_index(out, index)
    _remove_replaced(out, previous, index)
    _say(progress, f"expert store {out}: wrote {', '.join(todo)}" + (f", kept {', '.join(kept)}" if kept else ""))
    return out


def _say(enabled: bool, message: str) -> None:
    if enabled:
        tqdm.write(message, file=sys.stderr)


def _layouts(config, precisions, group_size: int, rounding: str) -> dict[str, BlobLayout]:
    names = [p.strip().lower() for p in ([precisions] if isinstance(precisions, str) else precisions)]
    if not names:
        raise StoreError("no precisions requested: pass e.g. --precisions bf16,int4")
    formats: dict[str, QuantFormat] = {n: parse_format(n, group_size) for n in dict.fromkeys(names)}
    return {n: blob_layout(f, config.hidden_size, config.moe_intermediate_size, rounding if f.is_grouped else "nearest",
                           bias=config.expert_bias)
            for n, f in formats.items()}


# ---- what an existing store offers -------------------------------------------------------------


def _previous_index(out: Path) -> dict | None:
    """The index of a complete store already in ``out`` (of any model), else None (a damaged index
    is treated as no store: everything is rebuilt)."""
    if not (out / INDEX_FILE).is_file():
        return None
    try:
        index = read_index(out)
        check_complete(index, out)
    except (StoreError, KeyError, TypeError, ValueError, IndexError):
        return None
    return index


def _satisfied(old: dict | None, out: Path, precision: str, layout: BlobLayout) -> bool:
    """Whether ``old`` already holds ``precision`` in ``layout`` with files of the recorded sizes."""
    rec = (old or {}).get("precisions", {}).get(precision)
    if rec is None or BlobLayout.from_json(rec["layout"]) != layout:
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == size for name, size in rec["files"].items())


def _prepare(out: Path, old: dict | None) -> None:
    """Create ``out``; drop leftovers of an interrupted convert; drop an index that will not be
    reused, so that a crash from here on leaves no store that looks complete."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the expert store folder {out} ({exc.strerror}): pass another --out") from None
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    if old is None and (out / INDEX_FILE).exists():
        (out / INDEX_FILE).unlink()


# ---- writing -----------------------------------------------------------------------------------


def _file_name(layout: BlobLayout, first: int, last: int) -> str:
    f = layout.format
    variant = (f"-g{f.group_size}" if f.is_grouped else "") + ("-hqq" if layout.rounding == "hqq" else "")
    return f"{f.name}{variant}-layers{first:03d}-{last:03d}.bin"


def _layer_chunks(config, layouts: dict[str, BlobLayout]) -> list[tuple[int, ...]]:
    """Consecutive MoE layers per data file, so that no file is much over FILE_TARGET_BYTES."""
    per_layer = config.num_experts * max(lay.nbytes for lay in layouts.values())
    n = max(1, FILE_TARGET_BYTES // per_layer)
    layers = tuple(config.moe_layers)
    return [layers[i:i + n] for i in range(0, len(layers), n)]


def _write_precisions(checkpoint, out: Path, layouts: dict[str, BlobLayout], progress: bool) -> dict[str, dict]:
    """Write the data files of every precision in ``layouts``, reading each expert from the
    checkpoint once, and return their index records."""
    config = checkpoint.config
    records = {p: {"layout": lay.to_json(), "files": {}, "experts": {}} for p, lay in layouts.items()}
    total = len(config.moe_layers) * config.num_experts
    with tqdm(total=total, desc=f"convert {','.join(layouts)}", unit="expert", disable=not progress) as bar:
        for chunk in _layer_chunks(config, layouts):
            names = {p: _file_name(lay, chunk[0], chunk[-1]) for p, lay in layouts.items()}
            _write_chunk(checkpoint, out, chunk, layouts, names, records, bar)
    return records


def _write_chunk(checkpoint, out: Path, chunk, layouts, names, records, bar) -> None:
    handles = {p: (out / (names[p] + ".tmp")).open("wb") for p in layouts}
    try:
        for layer in chunk:
            for rec in records.values():
                rec["experts"][str(layer)] = []
            for expert in range(checkpoint.config.num_experts):
                weights = _expert_weights(checkpoint, layer, expert)
                biases = _expert_biases(checkpoint, layer, expert)
                for p, lay in layouts.items():
                    records[p]["experts"][str(layer)].append(_append_blob(handles[p], names[p], weights, biases, lay))
                bar.update(1)
        for f in handles.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in handles.values():
            f.close()
    for p in layouts:
        os.replace(out / (names[p] + ".tmp"), out / names[p])
        records[p]["files"][names[p]] = (out / names[p]).stat().st_size


def _append_blob(f, file_name: str, weights, biases, layout: BlobLayout) -> list:
    blob = encode_expert(*weights, layout, bias=biases)
    offset = f.tell()
    f.write(blob.numpy())
    return [file_name, offset, layout.nbytes, blob_crc32(blob)]


def _expert_weights(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
    """One expert's (gate, up, down), checked for shape and finiteness so a bad tensor is named."""
    c = checkpoint.config
    gate, up, down = checkpoint.expert_weights(layer, expert)
    h, i = c.hidden_size, c.moe_intermediate_size
    for name, w, shape in (("gate", gate, (i, h)), ("up", up, (i, h)), ("down", down, (h, i))):
        where = f"layer {layer} expert {expert} {name}_proj in {checkpoint.path}"
        if tuple(w.shape) != shape:
            raise CheckpointError(f"{where} has shape {list(w.shape)}, expected {list(shape)} from config.json")
        if not bool(torch.isfinite(w).all()):
            raise CheckpointError(f"{where} contains NaN or infinite values: the checkpoint is damaged")
    return gate, up, down


def _expert_biases(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One expert's (gate_up, down) biases for families that have them, checked for finiteness."""
    if not checkpoint.config.expert_bias:
        return None
    biases = checkpoint.expert_biases(layer, expert)
    for name, b in zip(("gate_up_proj", "down_proj"), biases):
        if not bool(torch.isfinite(b).all()):
            raise CheckpointError(f"layer {layer} expert {expert} {name} bias in {checkpoint.path} contains NaN or "
                                  "infinite values: the checkpoint is damaged")
    return biases


def _write_index(out: Path, index: dict) -> None:
    tmp = out / (INDEX_FILE + ".tmp")
    with tmp.open("w") as f:
        json.dump(index, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / INDEX_FILE)


def _remove_replaced(out: Path, old: dict | None, index: dict) -> None:
    """Delete data files the old index listed and the new one does not (a rebuilt precision, or
    the store of another model that was replaced)."""
    if old is None:
        return
    keep = {name for rec in index["precisions"].values() for name in rec["files"]}
    for rec in old["precisions"].values():
        for name in rec["files"]:
            if name not in keep:
                (out / name).unlink(missing_ok=True)
