"""The engine with an offloading preset: store built on first use, same text as resident, clear errors."""

from __future__ import annotations

import pytest

from dymoe.bench.random_checkpoint import write_random_checkpoint
from dymoe.cli.main import main
from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.errors import InputError
from dymoe.runtime.presets import RuntimeConfig

TEXTS = ["Experts live on the host and the runtime fetches them when a token needs them. " * 30]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("rt") / "m", TEXTS, vocab_size=280, seed=5,
                                   hidden_size=64, num_hidden_layers=3, num_experts=8, moe_intermediate_size=64,
                                   head_dim=16)


def generate(model_dir, runtime, n=16):
    engine = Engine.load(EngineConfig(model_dir=model_dir, device="cpu", progress=False, runtime=runtime))
    return engine, list(engine.generate([5, 17, 33, 2, 90], SamplingParams(max_new_tokens=n)))


def test_lru_preset_builds_the_store_and_matches_resident(model_dir, capsys):
    _, resident = generate(model_dir, RuntimeConfig(policy="resident"))
    expert = 3 * 64 * 64 * 2
    engine, offloaded = generate(model_dir, RuntimeConfig(policy="lru", device_memory=16 * expert, progress=False))
    assert offloaded == resident
    assert engine.preset == "lru"
    assert "building the expert store for bf16" in capsys.readouterr().err
    assert (model_dir / "dymoe-store" / "index.json").exists()
    stats = engine.model.experts.stats()["total"]
    assert 0 < stats["hit_rate"] < 1 and stats["evictions"] > 0
    _, again = generate(model_dir, RuntimeConfig(policy="lru", device_memory=16 * expert, progress=False))
    assert again == resident
    assert "building" not in capsys.readouterr().err  # reused


def test_auto_is_resident_when_everything_fits(model_dir):
    engine, _ = generate(model_dir, RuntimeConfig(policy="auto", device_memory=1 << 30), n=2)
    assert engine.preset == "resident"
    engine, _ = generate(model_dir, RuntimeConfig(policy="auto", device_memory=20 * 3 * 64 * 64 * 2), n=2)
    assert engine.preset == "lru"


def test_a_percentage_budget_is_a_share_of_the_experts(model_dir, capsys):
    """``--device-memory 50%``: half the routed experts as bf16 slots (whole experts), in
    ``generate`` as in ``bench`` and ``inspect``; ``auto`` is resident at 100%. Bad percentages are one
    clear error each."""
    import json

    _, resident = generate(model_dir, RuntimeConfig(policy="resident"))
    engine, offloaded = generate(model_dir, RuntimeConfig(policy="lru", device_share=0.5, progress=False))
    assert engine.model.experts.pool.num_slots("bf16") == 12  # of 3 layers x 8 experts
    assert offloaded == resident
    assert generate(model_dir, RuntimeConfig(policy="auto", device_share=1.0), n=2)[0].preset == "resident"
    assert generate(model_dir, RuntimeConfig(policy="auto", device_share=0.99), n=2)[0].preset == "lru"
    capsys.readouterr()
    assert main(["inspect", str(model_dir), "--device-memory", "50%", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["device_memory"] == 12 * facts["bytes_per_expert"]["bf16"]
    assert facts["experts_that_fit"]["bf16"] == 12
    assert main(["generate", "-m", str(model_dir), "x", "-n", "2", "--policy", "lru", "--device-memory", "50%",
                 "--no-progress"]) == 0
    for bad, message in (("half%", "'half%' is not a size or a percentage"), ("0%", "must be above 0%")):
        assert main(["generate", "-m", str(model_dir), "x", "--policy", "lru", "--device-memory", bad]) == 2
        assert message in capsys.readouterr().err, bad


def test_offloading_preset_needs_a_budget(model_dir):
    with pytest.raises(InputError, match="--policy lru offloads experts: give --device-memory"):
        generate(model_dir, RuntimeConfig(policy="lru"))


def test_cli_stats_and_small_budget(model_dir, capsys):
    code = main(["generate", "-m", str(model_dir), "the host", "-n", "4", "--policy", "lru",
                 "--device-memory", "100KiB", "--stats", "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert "policy: lru" in err and "hit %" in err
    assert main(["generate", "-m", str(model_dir), "x", "--policy", "lru", "--device-memory", "1KiB"]) == 2
    assert "give at least" in capsys.readouterr().err


def test_corrupted_store_is_one_clear_error(model_dir, tmp_path, capsys):
    """Invariant 5 for stores: a truncated data file given with --store ends in one line, exit 2."""
    store = tmp_path / "store"
    assert main(["convert", str(model_dir), "--out", str(store), "--precisions", "bf16", "--no-progress"]) == 0
    data = sorted(store.glob("*.bin"))[0]
    data.write_bytes(data.read_bytes()[:-4096])
    capsys.readouterr()
    code = main(["generate", "-m", str(model_dir), "x", "-n", "2", "--policy", "lru", "--device-memory", "1MiB",
                 "--store", str(store), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and data.name in err[0] and "dymoe convert" in err[0]


@pytest.mark.parametrize("policy", ["lru", "dynaexq", "dymoe", "fate", "static-int4", "lru-prefetch", "arc", "lfu"])
def test_the_warm_up_leaves_the_text_and_counts_nothing(model_dir, policy):
    """``Engine.warm_up`` (run by ``load`` on a GPU): a throwaway prompt and decode step whose KV
    entries the next prompt overwrites and whose routing the runtime's counters forget."""
    expert = 3 * 64 * 64 * 2
    runtime = RuntimeConfig(policy=policy, device_memory=12 * expert, progress=False)
    cold, text = generate(model_dir, runtime)
    engine = Engine.load(EngineConfig(model_dir=model_dir, device="cpu", progress=False, runtime=runtime))
    engine.warm_up()
    experts = engine.model.experts
    assert experts.stats()["total"]["tokens"] == 0
    assert sum(experts.precision_uses.values()) == 0
    assert list(engine.generate([5, 17, 33, 2, 90], SamplingParams(max_new_tokens=16))) == text
    warm, cold_stats = experts.stats()["total"], cold.model.experts.stats()["total"]
    assert warm["tokens"] == cold_stats["tokens"] > 0  # the same tokens counted, none of the warm-up's
    assert sum(experts.precision_uses.values()) == sum(cold.model.experts.precision_uses.values())


def test_the_warm_up_fits_the_smallest_context(model_dir):
    """A 2-entry context (``--context-len 2``) warms up with a 1-token prompt, and generates after it."""
    engine = Engine.load(EngineConfig(model_dir=model_dir, device="cpu", progress=False, context_len=2))
    engine.warm_up()
    assert len(list(engine.generate([5], SamplingParams(max_new_tokens=4)))) == 1  # the context is full


def test_load_warms_up_on_a_gpu_only(model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(Engine, "warm_up", lambda self, progress=False: calls.append(progress))
    Engine.load(EngineConfig(model_dir=model_dir, device="cpu", progress=False))
    assert calls == []  # nothing compiles on the CPU: no throwaway token there
    from dymoe.cli.options import add_model_options, engine_config
    import argparse

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    assert engine_config(parser.parse_args(["-m", str(model_dir)])).warm_up is True
    assert engine_config(parser.parse_args(["-m", str(model_dir), "--no-warmup"])).warm_up is False
