"""DyMoE's calibration: per-layer sensitivity, the schedule file, and its use by the dymoe preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dymoe.cli.main import main
from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.errors import InputError
from dymoe.runtime.calibrate import Schedule
from dymoe.runtime.presets import RuntimeConfig

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "dymoe-demo-moe"
TEXT = ROOT / "tests" / "data" / "heldout_snippet.txt"


def test_calibrate_writes_a_schedule_of_the_most_sensitive_layers(tmp_path, capsys):
    out = tmp_path / "schedule.json"
    assert main(["calibrate", "-m", str(DEMO), "--text", str(TEXT), "--critical", "2", "--max-tokens", "200",
                 "--out", str(out), "--no-progress"]) == 0
    schedule = Schedule.load(out)
    assert sorted(schedule.sensitivity) == list(range(6))
    assert all(kl > 0 for kl in schedule.sensitivity.values())  # int4 changes every layer's output
    ranked = sorted(schedule.sensitivity, key=lambda l: -schedule.sensitivity[l])
    assert list(schedule.critical_layers) == sorted(ranked[:2])
    assert "critical layers" in capsys.readouterr().out


def test_schedule_sets_the_dymoe_presets_depth_floor(tmp_path):
    path = tmp_path / "s.json"
    Schedule("int4", {l: 1.0 for l in range(6)}, tuple(range(6))).save(path)
    runtime = RuntimeConfig(policy="dymoe", device_memory=96 * 98304, schedule=path, progress=False)
    engine = Engine.load(EngineConfig(model_dir=DEMO, device="cpu", progress=False, runtime=runtime))
    list(engine.generate([5, 17, 33, 2, 90], SamplingParams(max_new_tokens=8)))
    assert engine.model.experts.stats()["precision_uses"]["int4"] == 0  # every layer critical


def test_bad_schedule_and_wrong_preset(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(InputError, match="is not a dymoe schedule"):
        Schedule.load(bad)
    good = tmp_path / "good.json"
    Schedule("int4", {0: 1.0}, (0,)).save(good)
    runtime = RuntimeConfig(policy="lru", device_memory=96 * 98304, schedule=good)
    with pytest.raises(InputError, match="--policy lru has one precision"):
        Engine.load(EngineConfig(model_dir=DEMO, device="cpu", progress=False, runtime=runtime))
