"""The simulator: hand-computed hit rates, the textbook Belady example, the link model, and agreement
with a live OffloadedExperts run of the same routing (hits, misses, evictions and bytes, exactly)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from dymoe.bench.random_checkpoint import write_random_checkpoint
from dymoe.bench.simulate import LINKS, MEASURED_PCIE5_X16, SimResult, simulate
from dymoe.bench.trace import FORMAT, FORMAT_VERSION, Trace, record_trace
from dymoe.cli.main import main
from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.errors import BudgetError, InputError
from dymoe.runtime.metrics import RuntimeMetrics
from dymoe.runtime.presets import RuntimeConfig

DEMO = Path(__file__).resolve().parents[2] / "models" / "dymoe-demo-moe"
EB = 4096  # expert bytes of the hand-made traces
TEXTS = ["Experts live on the host and the runtime fetches them when a token needs them. " * 30]


def make_trace(prefill: list[list[list[int]]], decode: list[list[list[int]]], num_experts: int = 8) -> Trace:
    """One sequence: a prefill call of ``len(prefill)`` tokens (may be empty), then one decode call
    per entry of ``decode``; each token is a list over layers of its top-k expert lists."""
    tokens = prefill + decode
    layers, k = len(tokens[0]), len(tokens[0][0])
    ids = torch.tensor([[t[l] for t in tokens] for l in range(layers)], dtype=torch.int16)
    calls = ([[0, 0, len(prefill)]] if prefill else []) + [[0, len(prefill) + i, 1] for i in range(len(decode))]
    if not prefill:
        calls[0][1] = 0  # the first token is the prompt
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "expert_bytes": {"bf16": EB, "int4": EB // 4},
              "model": {"name": "hand", "family": "test", "num_experts": num_experts, "top_k": k,
                        "moe_layers": list(range(layers))}}
    return Trace(header, torch.tensor(calls, dtype=torch.int64), ids, torch.full(ids.shape, 1.0 / k),
                 torch.full((layers, 1, len(tokens), k), -1, dtype=torch.int16))


def one_layer_top1(sequence: list[int], num_experts: int = 8) -> Trace:
    return make_trace([], [[[e]] for e in sequence], num_experts)


def test_lru_and_lfu_by_hand():
    # 2 slots. LRU: hits at uses 2 and 3 only (0 is pushed out by 1 and 2 alternating).
    # LFU: 0 (used 3 times) stays; 1 and 2 take turns in the other slot: hits at uses 2, 3, 6, 9.
    trace = one_layer_top1([0, 0, 0, 1, 2, 0, 1, 2, 0])
    lru, lfu = simulate(trace, "lru", 2 * EB), simulate(trace, "lfu", 2 * EB)
    assert (lru.total.hits, lru.total.misses, lru.total.evictions) == (2, 7, 5)
    assert (lfu.total.hits, lfu.total.misses, lfu.total.evictions) == (4, 5, 3)
    assert lru.total.missed_bytes == 7 * EB and lru.total.h2d_bytes == 7 * EB
    assert simulate(trace, "on-demand", 2 * EB).total.hits == 0  # nothing kept across tokens
    assert simulate(trace, "lru", 3 * EB).total.hits == 6  # everything fits after the first use


def test_belady_textbook_reference_string():
    """Silberschatz et al., Operating System Concepts, reference string with 3 frames:
    OPT 9 faults, LRU 12 faults."""
    refs = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
    trace = one_layer_top1(refs)
    assert simulate(trace, "belady", 3 * EB).total.misses == 9
    assert simulate(trace, "lru", 3 * EB).total.misses == 12
    assert simulate(trace, "belady", 3 * EB).hit_rate == pytest.approx(11 / 20)


def test_prefill_waves_and_decode_order_by_hand():
    # Layer 0 only, top-2, 2 slots. Prefill of 2 tokens needs experts {0,1,2,3}: two waves of 2
    # misses (0,1 then 2,3, evicting 0 and 1). The decode token asks [0, 2] in router order: 0
    # misses and evicts the LRU of the unpinned {2, 3}, which is 2; then 2 misses and evicts 3.
    trace = make_trace([[[0, 1]], [[2, 3]]], [[[0, 2]]])
    r = simulate(trace, "lru", 2 * EB)
    assert (r.total.hits, r.total.misses, r.total.evictions) == (0, 6, 4)
    assert r.prefill_missed_bytes == 4 * EB and r.decode_missed_bytes == [2 * EB]
    # int4 decodes one token through the fused kernels' path too, so it takes the same router order
    # (before those kernels it went through the grouped path, resident first: 1 hit, 5 misses).
    r4 = simulate(trace, "static-int4", 2 * EB // 4)
    assert (r4.total.hits, r4.total.misses) == (0, 6)


def test_budget_below_top_k_is_refused():
    trace = make_trace([], [[[0, 1, 2, 3]]])
    with pytest.raises(BudgetError, match="one token needs 4"):
        simulate(trace, "lru", 3 * EB + EB - 1)
    with pytest.raises(InputError, match="unknown for the simulator"):
        simulate(trace, "no-such-policy", 8 * EB)


def test_link_model():
    r = SimResult("lru", "bf16", 0, EB, 0, RuntimeMetrics(), decode_missed_bytes=[0, 55_000_000, 110_000_000])
    assert r.tpot_s("pcie5x16") == pytest.approx((0 + 1e-3 + 2e-3) / 3)
    r.compute_s_per_token = 1.5e-3
    assert r.tpot_s("pcie5x16") == pytest.approx((1.5e-3 + 1.5e-3 + 2e-3) / 3)
    assert LINKS["pcie5x16"] == MEASURED_PCIE5_X16
    assert LINKS["pcie4x16"] == pytest.approx(MEASURED_PCIE5_X16 / 2)
    assert LINKS["pcie3x16"] == pytest.approx(LINKS["pcie4x8"]) == pytest.approx(MEASURED_PCIE5_X16 / 4)
    assert LINKS["pcie3x8"] == pytest.approx(MEASURED_PCIE5_X16 / 8)
    assert LINKS["nvme"] == 7e9


# -- simulated == live -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("sim") / "m", TEXTS, vocab_size=280, seed=5,
                                   hidden_size=64, num_hidden_layers=3, num_experts=8, moe_intermediate_size=64,
                                   head_dim=16)


def model_and_prompts():
    if (DEMO / "config.json").exists():
        from dymoe.engine.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(DEMO)
        texts = ["The Python interpreter", "import os\nfor name in os.listdir(path):", "Exceptions are raised when"]
        return DEMO, [tokenizer.encode(t) for t in texts]
    return None, None


def load(model_dir, runtime=RuntimeConfig()):
    return Engine.load(EngineConfig(model_dir=model_dir, device="cpu", progress=False, runtime=runtime))


def counters(metrics: RuntimeMetrics) -> dict:
    keys = ("hits", "misses", "evictions", "missed_bytes", "h2d_bytes", "tokens")
    return {layer: {k: getattr(c, k) for k in keys} for layer, c in sorted(metrics.layers.items())}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_dir):
    """(model dir, prompts, trace recorded with every expert resident, a store folder)."""
    model_dir, prompts = model_and_prompts()
    if model_dir is None:
        model_dir, prompts = tiny_dir, [[5, 17, 33, 2, 90], [7, 8], [40, 41, 42]]
    trace = record_trace(load(model_dir), prompts, 12)
    return model_dir, prompts, trace, tmp_path_factory.mktemp("store")


@pytest.mark.parametrize("policy", ["lru", "lfu", "on-demand", "least-stale"])
def test_simulated_equals_live_on_the_same_routing(demo, policy):
    """A live offloaded run (not traced) of the same prompts routes like the resident run (bf16
    offloading is invisible), so replaying the resident trace must give its counters exactly."""
    model_dir, prompts, trace, store = demo
    rng = random.Random(policy)
    eb = trace.header["expert_bytes"]["bf16"]
    total = len(trace.layers) * trace.num_experts
    for slots in (trace.top_k, rng.randrange(trace.top_k + 1, total // 2), rng.randrange(total // 2, total + 1)):
        budget = slots * eb + rng.randrange(eb)  # not always whole slots
        engine = load(model_dir, RuntimeConfig(policy=policy, device_memory=budget, store=store, progress=False))
        for prompt in prompts:
            list(engine.generate(prompt, SamplingParams(max_new_tokens=12)))
        simulated = simulate(trace, policy, budget)
        assert counters(simulated.metrics) == counters(engine.model.experts.metrics), (policy, slots)


def test_simulated_equals_live_at_int4(demo):
    """Low-bit experts change the routing, so the trace comes from the int4 run itself (traced live)."""
    model_dir, prompts, _, store = demo
    eb_int4 = record_trace(load(model_dir), prompts[:1], 1).header["expert_bytes"]["int4"]
    for slots in (5, 40):
        engine = load(model_dir, RuntimeConfig(policy="static-int4", device_memory=slots * eb_int4, store=store,
                                               progress=False))
        trace = record_trace(engine, prompts, 12)
        simulated = simulate(trace, "static-int4", slots * eb_int4)
        assert counters(simulated.metrics) == counters(engine.model.experts.metrics)


def test_belady_is_an_upper_bound_on_the_demo_trace(demo):
    _, _, trace, _ = demo
    eb = trace.header["expert_bytes"]["bf16"]
    total = len(trace.layers) * trace.num_experts
    for slots in (trace.top_k, total // 8, total // 4, total // 2):
        oracle = simulate(trace, "belady", slots * eb).total.hits
        for policy in ("lru", "lfu"):
            assert simulate(trace, policy, slots * eb).total.hits <= oracle, (policy, slots)


def test_cli_records_and_replays(tiny_dir, tmp_path, capsys):
    path = tmp_path / "t.trace"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the host\n\nruntime fetches\nexperts\n\n")
    assert main(["simulate", str(path), "--record", str(tiny_dir), "--prompts", str(prompts), "--gen-len", "4",
                 "--device", "cpu", "--policy", "lru,lfu", "--device-memory", "50%", "--link", "pcie4x16"]) == 0
    out = capsys.readouterr()
    assert "recorded" in out.err and path.exists()
    assert Trace.load(path).calls[:, 0].max() == 1  # two prompts
    for word in ("lru", "lfu", "belady", "pcie4x16", "12 bf16 experts of 24 (50.0%)", "predictor recall"):
        assert word in out.out, word
    assert "nvme" not in out.out
    assert main(["simulate", str(path), "--device-memory", "25%", "--expert-bytes", str(9 * 2**20),
                 "--link", "pcie5x16"]) == 0
    assert "54.00 MiB: 6 bf16 experts of 24 (25.0%), 9216 KiB each" in capsys.readouterr().out
    assert main(["simulate", str(path), "--device-memory", "1KiB"]) == 2
    assert "one token needs 4" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "none.trace")]) == 2
    assert "no trace file" in capsys.readouterr().err
    assert main(["simulate", str(path), "--link", "pcie9x1"]) == 2
    assert "--link" in capsys.readouterr().err
