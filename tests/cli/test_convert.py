"""``dymoe convert`` end to end through the CLI entry point."""

from __future__ import annotations

import shutil

import torch

from dymoe.checkpoint.blob import unpack_expert
from dymoe.checkpoint.reader import Checkpoint
from dymoe.checkpoint.store import ExpertStore
from dymoe.cli.main import main
from dymoe.models.transformer import load_dense


def test_convert_verify_and_reconvert(qwen3_dir, tmp_path, capsys):
    model = shutil.copytree(qwen3_dir, tmp_path / "model")
    assert main(["convert", str(model), "--precisions", "bf16,int2", "--group-size", "64", "--verify",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"expert store {model / 'dymoe-store'}" in out and "every checksum verified" in out
    index_mtime = (model / "dymoe-store" / "index.json").stat().st_mtime_ns
    assert main(["convert", str(model), "--precisions", "int2", "--group-size", "64"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (model / "dymoe-store" / "index.json").stat().st_mtime_ns == index_mtime
    assert ExpertStore.open(model / "dymoe-store").precisions == ("bf16", "int2")


def test_convert_to_an_explicit_store(qwen3_dir, tmp_path, capsys):
    assert main(["convert", str(qwen3_dir), "--out", str(tmp_path / "s"), "--precisions", "int8",
                 "--no-progress"]) == 0
    assert ExpertStore.open(tmp_path / "s").precisions == ("int8",)


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), "--precisions", "int5"]) == 2
    assert "unknown precision 'int5'" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), "--precisions", " , "]) == 2
    assert "names no precision" in capsys.readouterr().err


def test_deepseek_store_holds_the_routed_experts_only(checkpoints, tmp_path):
    """DeepSeek: the routed experts (``mlp.experts.N.gate_proj/up_proj/down_proj``) of the MoE layers
    go to the store; the dense first layer and the shared experts (``mlp.shared_experts``) stay with
    the resident model, loaded as dense weights and run without a gate."""
    path, hf = checkpoints["deepseek_v2"]
    assert main(["convert", str(path), "--out", str(tmp_path / "s"), "--precisions", "bf16", "--no-progress"]) == 0
    store = ExpertStore.open(tmp_path / "s")
    assert store.layers == (1, 2) and store.num_experts == 8  # layer 0 is dense (first_k_dense_replace 1)
    checkpoint = Checkpoint.open(path)
    gate, up, down = unpack_expert(store.blob(2, 5, "bf16"), store.layout("bf16"), torch.float32)
    for ours, theirs in zip((gate, up, down), checkpoint.expert_weights(2, 5)):
        torch.testing.assert_close(ours, theirs.bfloat16().float(), rtol=0, atol=0)
    model = load_dense(checkpoint, 16, "cpu", torch.float32)
    block = model.model.layers[1].mlp
    assert block.shared_expert_gate is None
    assert torch.equal(block.shared_expert.down_proj.weight, hf.model.layers[1].mlp.shared_experts.down_proj.weight)
