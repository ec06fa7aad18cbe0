"""``dymoe convert`` end to end through the CLI entry point."""

from __future__ import annotations

import shutil

from dymoe.checkpoint.store import ExpertStore
from dymoe.cli.main import main


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
