"""The ``dymoe`` command end to end on a small random checkpoint with a real tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dymoe.bench.random_checkpoint import write_random_checkpoint
from dymoe.cli.main import main
from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.engine.tokenizer import Tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20, "Experts live on the host; the runtime fetches them. " * 20]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("cli") / "m", TEXTS, vocab_size=300, seed=3,
                                   hidden_size=64, num_hidden_layers=2, num_experts=8, moe_intermediate_size=64,
                                   head_dim=16)


def reference_text(model_dir: Path, prompt: str, n: int) -> str:
    tokenizer = Tokenizer.from_dir(model_dir)
    engine = Engine.load(EngineConfig(model_dir=model_dir, device="cpu", progress=False),
                         eos_token_ids=tokenizer.eos_token_ids)
    ids = list(engine.generate(tokenizer.encode(prompt), SamplingParams(max_new_tokens=n)))
    return tokenizer.decode(ids)


def test_generate_streams_the_greedy_completion(model_dir, capsys):
    assert main(["generate", "-m", str(model_dir), "the fox", "-n", "12", "--device", "cpu", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert out == reference_text(model_dir, "the fox", 12) + "\n"
    assert "TTFT" in err and "tok/s" in err


def test_generate_reads_stdin(model_dir, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("the fox"))
    assert main(["generate", "-m", str(model_dir), "-n", "6", "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().out == reference_text(model_dir, "the fox", 6) + "\n"


def test_generate_stops_at_stop_string(model_dir, capsys):
    full = reference_text(model_dir, "the fox", 24)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), "the reference completion is too short to pick a stop string from"
    main(["generate", "-m", str(model_dir), "the fox", "-n", "24", "--stop", stop, "--no-progress"])
    out = capsys.readouterr().out
    assert out == full[: full.index(stop)] + "\n"


def test_prompt_longer_than_context(model_dir, capsys):
    code = main(["generate", "-m", str(model_dir), "the fox " * 20, "--context-len", "16", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "the context holds 16" in err and "--context-len" in err


def test_invalid_sampling_parameter_named(model_dir, capsys):
    assert main(["generate", "-m", str(model_dir), "x", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_inspect_json_counts(model_dir, capsys):
    assert main(["inspect", str(model_dir), "--device-memory", "100KiB", "--json", "--group-size", "64"]) == 0
    facts = json.loads(capsys.readouterr().out)
    h, i = 64, 64
    assert facts["bytes_per_expert"]["bf16"] == 3 * h * i * 2
    assert facts["expert_parameters"] == 2 * 8 * 3 * h * i
    assert facts["experts_that_fit"]["bf16"] == (100 * 1024) // (3 * h * i * 2)
    assert facts["bytes_per_expert"]["int4"] < facts["bytes_per_expert"]["int8"] < facts["bytes_per_expert"]["bf16"]
    total = sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
    assert facts["parameters"] == total


def test_inspect_deepseek(checkpoints, capsys):
    """DeepSeek-V2: latent attention, the dense first layer, and the shared experts counted as dense."""
    path, hf = checkpoints["deepseek_v2"]
    assert main(["inspect", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    h, i = 32, 24
    assert facts["architecture"] == "deepseek_v2" and facts["attention"].startswith("multi-head latent (MLA)")
    assert (facts["layers"], facts["moe_layers"], facts["experts_per_layer"], facts["experts_per_token"]) == (3, 2, 8, 3)
    assert facts["shared_expert_width"] == 2 * i
    assert facts["expert_parameters"] == 2 * 8 * 3 * h * i
    assert facts["parameters"] == sum(p.numel() for p in hf.state_dict().values())
    # the cache holds expanded keys (8 + 8) and values (12) for each of the 4 heads, 3 layers, bf16
    assert facts["kv_cache_bytes_per_token_bf16"] == 2 * 3 * 4 * (16 + 12)
    assert main(["inspect", str(path)]) == 0
    assert "architecture     deepseek_v2" in capsys.readouterr().out


def test_inspect_bad_size(model_dir, capsys):
    assert main(["inspect", str(model_dir), "--device-memory", "lots"]) == 2
    assert "--device-memory 'lots' is not a size" in capsys.readouterr().err


def _broken_copies(model_dir: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (folder, text the one-line error must contain)."""
    cases = {"missing": (root / "nope", "does not exist")}
    (root / "empty").mkdir()
    cases["no_config"] = (root / "empty", "has no config.json")

    def copy(name):
        dst = root / name
        shutil.copytree(model_dir, dst)
        return dst

    arch = copy("arch")
    config = json.loads((arch / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (arch / "config.json").write_text(json.dumps(config))
    cases["arch"] = (arch, "supported: DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, GptOssForCausalLM, MixtralForCausalLM")

    for name, edit, expect in [
        ("missing_tensor", lambda t: t.pop("model.norm.weight"), "tensor model.norm.weight is missing"),
        ("shape", lambda t: t.update({"model.norm.weight": torch.ones(5)}), "model.norm.weight in model.safetensors"),
    ]:
        folder = copy(name)
        tensors = load_file(str(folder / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(folder / "model.safetensors"))
        cases[name] = (folder, expect)

    truncated = copy("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    cases["truncated"] = (truncated, "truncated")
    return cases


def test_bad_inputs_end_in_one_line_and_exit_2(model_dir, tmp_path):
    """Invariant 5 through the real executable: no traceback, status 2, one line on stderr."""
    for name, (folder, expect) in _broken_copies(model_dir, tmp_path).items():
        proc = subprocess.run(
            [sys.executable, "-m", "dymoe", "generate", "-m", str(folder), "hello", "-n", "2", "--no-progress"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (name, proc.stderr)
        assert expect in lines[0], (name, lines[0])
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("switch", ["DYMOE_RESIDENT_DECODE", "DYMOE_FUSED_DENSE"])
def test_a_bad_environment_switch_is_one_line_and_exit_2(switch):
    """The DYMOE_* switches are read when the sub-commands are imported: a bad value still ends as
    one line naming the switch and its choices, status 2, no traceback."""
    env = dict(os.environ, **{switch: "bad"})
    proc = subprocess.run([sys.executable, "-m", "dymoe", "generate", "--help"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dymoe: error: {switch}='bad': use "), proc.stderr
