"""``--policy-config``: a small TOML/JSON file of knobs overriding a preset's runtime config."""

from __future__ import annotations

import pytest

from dymoe.bench.random_checkpoint import write_random_checkpoint
from dymoe.cli.main import main
from dymoe.engine.engine import Engine, EngineConfig
from dymoe.errors import InputError
from dymoe.runtime.presets import RuntimeConfig, load_knobs, preset_precisions

TEXTS = ["Experts live on the host; the runtime fetches them when a token needs them. " * 20]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_and_json_knobs_are_typed_and_checked(tmp_path):
    toml = write(tmp_path, "k.toml", 'prefetch_depth = 2\neviction = "arc"\nimportant_mass = 1\ncritical_layers = [0]\n')
    assert load_knobs(toml, "dymoe") == {"prefetch_depth": 2, "eviction": "arc", "important_mass": 1,
                                         "critical_layers": (0,)}
    assert load_knobs(write(tmp_path, "k.json", '{"decay": 0.5, "interval": 8}'), "dynaexq") == {"decay": 0.5,
                                                                                               "interval": 8}
    cases = {
        "prefetch = 2\n": "'prefetch' is not a knob of --policy lru; choose from ",
        'prefetch_depth = "2"\n': "prefetch_depth = '2' should be of type int",
        "substitute = 1\n": "substitute = 1 should be of type bool",
        "prefetch_depth = [\n": "not valid TOML",
        'eviction = "mru"\n': "eviction = 'mru': choose from lru, lfu, arc",
        'precision = "int5"\n': "precision = 'int5': choose from bf16, int8, int4",
    }
    for text, message in cases.items():
        with pytest.raises(InputError, match=message.replace("[", r"\[")) as info:
            load_knobs(write(tmp_path, "bad.toml", text), "lru")
        assert str(tmp_path / "bad.toml") in str(info.value)
    with pytest.raises(InputError, match="cannot read it"):
        load_knobs(tmp_path / "missing.toml", "lru")


def test_a_knob_that_changes_the_precision_changes_the_store_precisions(tmp_path):
    knobs = load_knobs(write(tmp_path, "k.toml", 'precision = "int8"\n'), "lru")
    assert preset_precisions("lru", knobs) == ("int8",)
    assert preset_precisions("dymoe", {"low_precision": "int2"}) == ("bf16", "int2")


def test_knobs_reach_the_runtime_and_the_cli_refuses_a_bad_file(tmp_path, capsys):
    model = write_random_checkpoint(tmp_path / "m", TEXTS, vocab_size=200, seed=2, hidden_size=32,
                                    num_hidden_layers=2, num_experts=8, moe_intermediate_size=32, head_dim=8)
    knobs = write(tmp_path, "k.toml", 'prefetch_depth = 1\neviction = "lfu"\n')
    runtime = RuntimeConfig(policy="lru", device_memory=1 << 20, policy_config=knobs, progress=False)
    engine = Engine.load(EngineConfig(model_dir=model, device="cpu", progress=False, runtime=runtime))
    config = engine.model.experts.config
    assert (config.prefetch_depth, config.eviction, config.precision) == (1, "lfu", "bf16")
    assert engine.model.experts.predictor is not None
    bad = write(tmp_path, "bad.toml", "prefetch_depth = true\n")
    capsys.readouterr()
    code = main(["generate", "-m", str(model), "hi", "-n", "2", "--device", "cpu", "--no-progress", "--policy", "lru",
                 "--device-memory", "1MiB", "--policy-config", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "prefetch_depth = True should be of type int" in err and len(err.strip().splitlines()) == 1
