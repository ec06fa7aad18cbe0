"""The expert store: round trips, alignment, checksums, crash safety, re-convert, clear errors."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from dymoe.checkpoint.blob import BLOB_ALIGN, PART_ALIGN, BlobLayout, blob_layout, encode_expert, unpack_expert
from dymoe.checkpoint.convert import convert_store
from dymoe.checkpoint.store import INDEX_FILE, ExpertStore
from dymoe.errors import CheckpointError, StoreError
from dymoe.models.config import ModelConfig
from dymoe.quant.formats import parse_format
from dymoe.quant.reference import dequantize, quantize

ALL = ("bf16", "int8", "int4", "int3", "int2")


def tiny_config(hidden: int = 64, inter: int = 96, experts: int = 4, moe_layers=(0, 2)) -> ModelConfig:
    return ModelConfig(family="qwen3_moe", vocab_size=32, hidden_size=hidden, num_layers=3, num_heads=2,
                       num_kv_heads=1, head_dim=32, intermediate_size=128, moe_intermediate_size=inter,
                       num_experts=experts, num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                       moe_layers=tuple(moe_layers))


@dataclass
class StandInCheckpoint:
    """Just the three members the store may use: path, config, expert_weights."""

    path: Path
    config: ModelConfig
    seed: int = 0
    fail_at: tuple[int, int] | None = None
    reads: list = field(default_factory=list)

    def expert_weights(self, layer: int, expert: int):
        if (layer, expert) == self.fail_at:
            raise KeyboardInterrupt  # what a user's Ctrl-C mid-convert looks like
        self.reads.append((layer, expert))
        g = torch.Generator().manual_seed(self.seed * 10_000 + layer * 100 + expert)
        h, i = self.config.hidden_size, self.config.moe_intermediate_size
        return tuple((torch.randn(shape, generator=g) * 0.05).bfloat16() for shape in ((i, h), (i, h), (h, i)))


@pytest.fixture
def model(tmp_path) -> StandInCheckpoint:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3_moe"}')
    return StandInCheckpoint(folder, tiny_config())


def convert(model, out, precisions=ALL, **kw) -> Path:
    return convert_store(model, out, precisions=precisions, group_size=kw.pop("group_size", 64), progress=False, **kw)


def data_file(store_dir: Path, prefix: str) -> Path:
    return next(p for p in sorted(store_dir.glob("*.bin")) if p.name.startswith(prefix))


# ---- round trip --------------------------------------------------------------------------------


def test_round_trip_of_every_expert_and_precision(model, tmp_path):
    store = ExpertStore.open(convert(model, tmp_path / "store"), checkpoint=model)
    assert store.precisions == ALL and store.layers == (0, 2)
    for layer in store.layers:
        for expert in range(store.num_experts):
            weights = model.expert_weights(layer, expert)
            for precision in ALL:
                got = store.unpack(layer, expert, precision, torch.float32)
                fmt = parse_format(precision, 64)
                for w, g in zip(weights, got):
                    assert torch.equal(g, dequantize(quantize(w, fmt), torch.float32)), (layer, expert, precision)
    for w, g in zip(model.expert_weights(2, 3), store.unpack(2, 3, "bf16")):
        assert torch.equal(w, g)  # bf16 is exact


def test_hqq_rounding_is_recorded_and_used(model, tmp_path):
    store = ExpertStore.open(convert(model, tmp_path / "store", precisions=("int3",), rounding="hqq"))
    assert store.layout("int3").rounding == "hqq"
    gate = model.expert_weights(0, 1)[0]
    expected = dequantize(quantize(gate, parse_format("int3", 64), "hqq"), torch.float32)
    assert torch.equal(store.unpack(0, 1, "int3", torch.float32)[0], expected)


def test_every_blob_and_part_is_aligned(model, tmp_path):
    store = ExpertStore.open(convert(model, tmp_path / "store"))
    for precision in ALL:
        layout = store.layout(precision)
        assert layout.nbytes % BLOB_ALIGN == 0
        assert all(p.offset % PART_ALIGN == 0 for p in layout.parts)
        for layer in store.layers:
            for expert in range(store.num_experts):
                assert store.entry(layer, expert, precision).offset % BLOB_ALIGN == 0
                assert store.blob(layer, expert, precision).data_ptr() % BLOB_ALIGN == 0


def test_blob_layout_order_and_json_round_trip():
    layout = blob_layout(parse_format("int4", 128), hidden_size=2048, intermediate_size=768)
    assert [p.name for p in layout.parts] == ["gate.weight", "up.weight", "down.weight", "gate.scales", "up.scales",
                                              "down.scales", "gate.mins", "up.mins", "down.mins"]
    gate, up = layout.part("gate.weight"), layout.part("up.weight")
    assert up.offset == gate.offset + gate.nbytes  # gate and up read as one fused [2I, H/2] operand
    assert BlobLayout.from_json(json.loads(json.dumps(layout.to_json()))) == layout


def test_blob_views_are_zero_copy(model, tmp_path):
    store = ExpertStore.open(convert(model, tmp_path / "store", precisions=("bf16",)))
    a, b = store.blob(0, 1, "bf16"), store.blob(0, 1, "bf16")
    assert a.data_ptr() == b.data_ptr()


def test_unpack_expert_of_an_in_memory_blob_matches_reference():
    layout = blob_layout(parse_format("int2", 64), hidden_size=96, intermediate_size=40)  # padded groups
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(40, 96, generator=g), torch.randn(40, 96, generator=g), torch.randn(96, 40, generator=g))
    for w, got in zip(weights, unpack_expert(encode_expert(*weights, layout), layout, torch.float32)):
        assert torch.equal(got, dequantize(quantize(w, layout.format), torch.float32))


# ---- corruption and user errors ----------------------------------------------------------------


def test_flipped_byte_is_caught_by_verify(model, tmp_path):
    out = convert(model, tmp_path / "store")
    store = ExpertStore.open(out)
    entry = store.entry(2, 1, "int4")
    del store
    path = out / entry.file
    data = bytearray(path.read_bytes())
    data[entry.offset + 100] ^= 0x10
    path.write_bytes(bytes(data))
    store = ExpertStore.open(out)
    store.verify(2, 0, "int4")  # a neighbour is fine
    with pytest.raises(StoreError, match=rf"{entry.file} is corrupted.*layer 2 expert 1.*re-run `dymoe convert"):
        store.verify(2, 1, "int4")
    with pytest.raises(StoreError, match="corrupted"):
        store.verify_all()


def test_truncated_data_file_is_caught_at_open(model, tmp_path):
    out = convert(model, tmp_path / "store")
    path = data_file(out, "int2")
    os.truncate(path, path.stat().st_size - 4096)
    with pytest.raises(StoreError, match=rf"{path.name} is truncated.*re-run `dymoe convert {model.path} --out"):
        ExpertStore.open(out)


def test_missing_data_file_is_caught_at_open(model, tmp_path):
    out = convert(model, tmp_path / "store")
    data_file(out, "bf16").unlink()
    with pytest.raises(StoreError, match="is missing from the expert store"):
        ExpertStore.open(out)


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match=r"no expert store at .*nowhere: create one with `dymoe convert"):
        ExpertStore.open(tmp_path / "nowhere")


def test_wrong_format_version(model, tmp_path):
    out = convert(model, tmp_path / "store", precisions=("int4",))
    index = json.loads((out / INDEX_FILE).read_text())
    index["format_version"] = 99
    (out / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(StoreError, match="format version 99, this dymoe reads version 1: re-run `dymoe convert"):
        ExpertStore.open(out)


def test_store_of_another_model_is_refused_at_open(model, tmp_path):
    out = convert(model, tmp_path / "store", precisions=("int4",))
    (model.path / "config.json").write_text('{"model_type": "qwen3_moe", "changed": true}')
    with pytest.raises(StoreError, match=rf"built from another model.*re-run `dymoe convert {model.path} --out"):
        ExpertStore.open(out, checkpoint=model)


def test_missing_precision_names_how_to_add_it(model, tmp_path):
    store = ExpertStore.open(convert(model, tmp_path / "store", precisions=("bf16", "int4")))
    with pytest.raises(StoreError, match=r"no int2 copies .*--precisions bf16,int4,int2"):
        store.blob(0, 0, "int2")
    with pytest.raises(StoreError, match="no expert 9 in layer 0"):
        store.blob(0, 9, "int4")


def test_bad_expert_tensor_names_layer_and_expert(model, tmp_path):
    model.config = tiny_config(inter=80)
    model.expert_weights = lambda layer, expert: (torch.zeros(80, 64), torch.zeros(80, 64), torch.zeros(64, 81))
    with pytest.raises(CheckpointError, match=r"layer 0 expert 0 down_proj .* shape \[64, 81\], expected \[64, 80\]"):
        convert(model, tmp_path / "store")


# ---- crash safety and re-convert ---------------------------------------------------------------


def test_interrupted_convert_leaves_no_complete_store(model, tmp_path):
    model.fail_at = (2, 1)
    with pytest.raises(KeyboardInterrupt):
        convert(model, tmp_path / "store")
    assert not (tmp_path / "store" / INDEX_FILE).exists()
    with pytest.raises(StoreError, match="is incomplete"):
        ExpertStore.open(tmp_path / "store")
    model.fail_at = None
    ExpertStore.open(convert(model, tmp_path / "store")).verify_all()
    assert not list((tmp_path / "store").glob("*.tmp"))


def test_reconvert_of_a_complete_store_is_a_no_op(model, tmp_path):
    out = convert(model, tmp_path / "store")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    model.reads.clear()
    convert(model, out, precisions=("int4", "bf16"))
    assert model.reads == []
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_reconvert_adds_missing_precisions_and_keeps_the_rest(model, tmp_path):
    out = convert(model, tmp_path / "store", precisions=("bf16",))
    bf16_file = data_file(out, "bf16")
    mtime = bf16_file.stat().st_mtime_ns
    convert(model, out, precisions=("int2",))
    store = ExpertStore.open(out)
    assert store.precisions == ("bf16", "int2")
    assert bf16_file.stat().st_mtime_ns == mtime
    store.verify_all()


def test_reconvert_with_another_group_size_rebuilds_that_precision(model, tmp_path):
    out = convert(model, tmp_path / "store", precisions=("int4",), group_size=128)
    convert(model, out, precisions=("int4",), group_size=64)
    assert [p.name.split("-layers")[0] for p in out.glob("*.bin")] == ["int4-g64"]
    assert ExpertStore.open(out).layout("int4").format.group_size == 64


def test_reconvert_for_another_model_rebuilds(model, tmp_path):
    out = convert(model, tmp_path / "store", precisions=("int8",))
    other = StandInCheckpoint(model.path, tiny_config(experts=3), seed=5)
    convert(other, out, precisions=("int4",))
    store = ExpertStore.open(out, checkpoint=other)
    assert store.precisions == ("int4",) and store.num_experts == 3
    assert [p.name.split("-")[0] for p in out.glob("*.bin")] == ["int4"]


def test_large_models_are_split_into_several_files(model, tmp_path, monkeypatch):
    import dymoe.checkpoint.convert as convert_module

    monkeypatch.setattr(convert_module, "FILE_TARGET_BYTES", 1)
    store = ExpertStore.open(convert(model, tmp_path / "store", precisions=("int4",)))
    names = sorted(p.name for p in store.path.glob("*.bin"))
    assert names == ["int4-g64-layers000-000.bin", "int4-g64-layers002-002.bin"]
    store.verify_all()


# ---- the real reader ---------------------------------------------------------------------------


def test_store_of_a_real_checkpoint(qwen3_dir, tmp_path):
    """Through dymoe's own reader; H=32 is smaller than a group, so this also covers padding."""
    from dymoe.checkpoint.reader import Checkpoint

    checkpoint = Checkpoint.open(qwen3_dir)
    out = convert(checkpoint, tmp_path / "store", precisions=("bf16", "int4"))
    store = ExpertStore.open(out, checkpoint=checkpoint)
    layer = checkpoint.config.moe_layers[-1]
    gate, up, down = checkpoint.expert_weights(layer, 5)
    got = store.unpack(layer, 5, "int4", torch.float32)
    assert torch.equal(got[2], dequantize(quantize(down, parse_format("int4", 64)), torch.float32))
    assert torch.equal(store.unpack(layer, 5, "bf16", torch.float32)[0], gate.bfloat16().float())


def test_default_store_dir(tmp_path, monkeypatch):
    import dymoe.checkpoint.store as store_module

    assert store_module.default_store_dir(tmp_path) == tmp_path / "dymoe-store"
    monkeypatch.setattr(store_module.os, "access", lambda path, mode: False)
    monkeypatch.setattr(store_module.Path, "home", classmethod(lambda cls: tmp_path / "home"))
    fallback = store_module.default_store_dir(tmp_path / "Qwen3-30B-A3B")
    assert fallback.parent == tmp_path / "home" / ".cache" / "dymoe" / "stores"
    assert fallback.name.startswith("Qwen3-30B-A3B-")


@pytest.mark.parametrize("damage", ["not json", "[]", "no precisions", "blob outside its file"])
def test_damaged_index_is_a_store_error(model, tmp_path, damage):
    out = convert(model, tmp_path / "store", precisions=("int4",))
    index = json.loads((out / INDEX_FILE).read_text())
    if damage == "no precisions":
        del index["precisions"]
    elif damage == "blob outside its file":
        index["precisions"]["int4"]["experts"]["2"][3][1] += 1 << 20
    text = {"not json": "{", "[]": "[]"}.get(damage, json.dumps(index))
    (out / INDEX_FILE).write_text(text)
    with pytest.raises(StoreError, match=r"index.json .*re-run `dymoe convert"):
        ExpertStore.open(out)


def test_convert_over_a_damaged_index_rebuilds(model, tmp_path):
    out = convert(model, tmp_path / "store", precisions=("int4",))
    (out / INDEX_FILE).write_text('{"format_version": 1}')
    convert(model, out, precisions=("int4",))
    ExpertStore.open(out, checkpoint=model).verify_all()
