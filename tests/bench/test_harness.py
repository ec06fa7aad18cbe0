"""The ``dymoe bench`` harness and ``dymoe eval`` on CPU: a tiny synthetic shape and the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dymoe.bench.harness import BenchConfig, format_table, run_bench
from dymoe.bench.trace import Trace
from dymoe.cli.main import main
from dymoe.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "dymoe-demo-moe"
SNIPPET = ROOT / "tests" / "data" / "heldout_snippet.txt"
BF16_PRESETS = ("on-demand", "on-demand-prefetch", "lru", "lfu", "lru-prefetch")
COLUMNS = ("TTFT@8 ms", "TTFT@24 ms", "TPOT ms", "tok/s", "hit %", "H2D MiB/tok", "stall %", "pf prec", "pf use %",
           "top1", "ppl", "KL")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> dict:
    trace = tmp_path_factory.mktemp("bench") / "tiny.trace"
    config = BenchConfig(model="synthetic:qwen3-30b-a3b", tiny=True, layers=3,
                         policies=("resident", *BF16_PRESETS, "static-int4"), budgets=("25%", "60%"),
                         prompt_lens=(8, 24), gen_len=6, device="cpu", progress=False)
    return run_bench(config, argv=["dymoe", "bench", "--tiny"], trace_path=trace)


def rows(report: dict) -> dict[str, dict]:
    return {r["preset"] if r["budget"] is None else f"{r['preset']}@{r['budget']}": r for r in report["rows"]}


def test_table_has_every_column_and_row(tiny_report):
    table = format_table(tiny_report)
    for column in COLUMNS:
        assert column in table
    for name in rows(tiny_report):
        assert f"\n{name} " in table
    assert len(tiny_report["rows"]) == 1 + 2 * (len(BF16_PRESETS) + 1)


def test_report_round_trips_through_json(tiny_report, tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(tiny_report))
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(tiny_report))
    assert loaded["command"] == "dymoe bench --tiny"
    for key in ("date", "device", "torch"):
        assert loaded["environment"][key]
    assert "h2d_bytes_per_s" in loaded  # None on CPU


def test_environment_records_the_dymoe_settings(monkeypatch):
    """A report names every DYMOE_* setting it ran under (they pick kernel paths) and nothing else
    from the environment, and Triton's version (None where the gpu extra is not installed)."""
    import importlib.util

    from dymoe.bench.harness import environment

    monkeypatch.setenv("DYMOE_RESIDENT_DECODE", "grouped")
    monkeypatch.setenv("DYMOE_PDL", "0")
    monkeypatch.setenv("NOT_DYMOE_THING", "x")
    env = environment(torch.device("cpu"))
    settings = env["settings"]
    assert settings["DYMOE_RESIDENT_DECODE"] == "grouped" and settings["DYMOE_PDL"] == "0"
    assert all(k.startswith("DYMOE_") for k in settings) and list(settings) == sorted(settings)
    assert (env["triton"] is None) == (importlib.util.find_spec("triton") is None)


def test_resident_is_its_own_reference(tiny_report):
    q = rows(tiny_report)["resident"]["quality"]
    assert q["top1_agreement"] == 1.0 and q["kl_mean"] == 0.0
    assert q["positions"] == 2 * 6


@pytest.mark.parametrize("budget", ["25%", "60%"])
@pytest.mark.parametrize("preset", BF16_PRESETS)
def test_offloading_at_bf16_is_invisible(tiny_report, preset, budget):
    """Invariant 2 seen through the harness: the same distributions, bit for bit, at every position."""
    row = rows(tiny_report)[f"{preset}@{budget}"]
    reference = rows(tiny_report)["resident"]["quality"]
    assert row["quality"]["top1_agreement"] == 1.0
    assert row["quality"]["kl_mean"] == 0.0
    assert row["quality"]["perplexity"] == reference["perplexity"]
    assert row["counters"]["hits"] + row["counters"]["misses"] > 0


def test_runtime_figures(tiny_report):
    r = rows(tiny_report)
    assert r["on-demand@25%"]["hit_rate"] == 0.0  # nothing kept across layers, no prefetch
    assert r["lru@60%"]["hit_rate"] >= r["lru@25%"]["hit_rate"]
    assert r["lru-prefetch@25%"]["prefetch_precision"] is not None
    assert r["lru@25%"]["prefetch_precision"] is None and r["lru@25%"]["prefetch_share"] == 0.0
    assert r["static-int4@25%"]["quality"]["kl_mean"] > 0.0  # int4 is not bit-identical
    assert tiny_report["budgets"]["60%"] > tiny_report["budgets"]["25%"]


def test_recorded_trace_is_the_resident_routing(tiny_report):
    trace = Trace.load(tiny_report["trace"])
    assert trace.num_tokens == (8 + 5) + (24 + 5)
    assert trace.header["recipe"]["source"] == "dymoe bench"


def test_demo_model_bf16_offloading_matches_resident():
    config = BenchConfig(model=str(DEMO), policies=("resident", "lru-prefetch"), budgets=("25%",),
                         prompt_lens=(16, 64), gen_len=6, device="cpu", text=SNIPPET, progress=False)
    report = run_bench(config, argv=["dymoe", "bench"])
    r = rows(report)
    assert r["lru-prefetch@25%"]["quality"]["kl_mean"] == 0.0
    assert r["lru-prefetch@25%"]["quality"]["top1_agreement"] == 1.0
    assert r["lru-prefetch@25%"]["counters"]["prefetches"] > 0
    assert report["budgets"]["25%"] == 48 * 98304  # a quarter of the 192 bf16 experts, whole experts


def test_cli_bench_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = main(["bench", "--model", "synthetic:mixtral-8x7b", "--tiny", "--layers", "2", "--policies", "lru",
                   "--prompt-len", "8", "--gen-len", "3", "--device-memory", "50%", "--device", "cpu",
                   "--no-progress", "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "resident" in printed and "lru@50%" in printed
    report = json.loads(out.read_text())
    assert [r["preset"] for r in report["rows"]] == ["resident", "lru"]


@pytest.mark.parametrize("argv, message", [
    (["--policies", "belady"], "--policies"),
    (["--prompt-len", "8,x"], "--prompt-len"),
    (["--device-memory", "lots"], "--device-memory"),
    (["--gen-len", "1"], "--gen-len"),
])
def test_cli_bench_user_errors(argv, message, capsys):
    base = ["bench", "--model", "synthetic:qwen3-30b-a3b", "--tiny", "--layers", "1", "--device", "cpu",
            "--no-progress", "--prompt-len", "4", "--gen-len", "2"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_layers_apply_to_synthetic_models_only():
    with pytest.raises(InputError, match="--layers"):
        run_bench(BenchConfig(model=str(DEMO), layers=2, device="cpu", prompt_lens=(4,), gen_len=2))


def test_eval_perplexity_matches_the_model_card(capsys):
    recorded = json.loads((DEMO / "training_report.json").read_text())["snippet"]["perplexity"]
    status = main(["eval", "-m", str(DEMO), "--text", str(SNIPPET), "--device", "cpu", "--no-progress", "--json"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(recorded, rel=0.02)
    assert result["policy"] == "resident" and result["tokens"] > 1000


def test_eval_missing_file(tmp_path, capsys):
    assert main(["eval", "-m", str(DEMO), "--text", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err


def test_dynaexq_in_the_bench_table_with_its_fallback(capsys):
    """dynaexq runs side by side with the other presets on a synthetic model: at 25% of the bf16
    bytes not every int4 copy fits (the fallback, announced on stderr; int4 copies fetched on
    demand), at 150% they all do (nothing fetched on a miss; at tiny widths a page-aligned int4 blob
    is as large as a bf16 one); the table explains its columns."""
    config = BenchConfig(model="synthetic:qwen3-30b-a3b", tiny=True, layers=2, policies=("resident", "dynaexq", "lru"),
                         budgets=("25%", "150%"), prompt_lens=(8,), gen_len=12, device="cpu", progress=False)
    report = run_bench(config, argv=["dymoe", "bench"])
    assert "int4 tier is offloaded too" in capsys.readouterr().err
    r = rows(report)
    tight, roomy = r["dynaexq@25%"], r["dynaexq@150%"]
    assert tight["counters"]["missed_bytes"] > 0 and roomy["counters"]["missed_bytes"] == 0
    assert roomy["counters"]["prefetches"] > 0 and roomy["hit_rate"] > 0  # promotions landed and served
    for row in (tight, roomy):
        assert row["counters"]["hits"] + row["counters"]["misses"] == 2 * 4 * 11  # layers x top-k x decode steps
        assert row["quality"]["kl_mean"] > 0 and row["quality"]["top1_agreement"] > 0.5  # int4: close, not exact
    table = format_table(report)
    assert "\ndynaexq@25% " in table and "dynaexq: hit % = expert uses served by a landed bf16 promotion" in table
    assert "dynaexq:" not in format_table({**report, "rows": [r["resident"], r["lru@25%"]]})


def test_bench_rows_say_how_many_steps_the_mapped_decode_ran(monkeypatch):
    """A row of a runtime with a mapped decode counts the decode steps it ran, so a report shows
    what ``DYMOE_MAPPED_DECODE`` did. On the CPU the bench decodes through the plain forward (the
    mapped decode steps only inside the graph decode), so a mapped runtime's row says 0 and its
    figures are the segmented one's."""
    from dymoe.runtime import mapped

    config = BenchConfig(model="synthetic:qwen3-30b-a3b", tiny=True, layers=2, policies=("resident", "static-int4"),
                         budgets=("60%",), prompt_lens=(8,), gen_len=6, device="cpu", progress=False)
    reports = {}
    for setting in ("0", "1"):
        monkeypatch.setattr(mapped, "MAPPED", setting)
        reports[setting] = rows(run_bench(config, argv=["dymoe", "bench"]))["static-int4@60%"]
    assert "mapped_decode_steps" not in reports["0"]
    assert reports["1"]["mapped_decode_steps"] == 0
    assert reports["1"]["quality"] == reports["0"]["quality"]
    timed = ("stall_seconds",)
    assert {k: v for k, v in reports["1"]["counters"].items() if k not in timed} == {
        k: v for k, v in reports["0"]["counters"].items() if k not in timed}
