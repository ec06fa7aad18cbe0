"""Skewed synthetic routing (dymoe/bench/routing.py): deterministic, skewed, local, realistic for the
predictor, weights from the real router, invisible to offloading at bf16, and labelled everywhere."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dymoe.bench.harness import BenchConfig, format_table, run_bench
from dymoe.bench.routing import SyntheticRouting, parse_routing, popularity, route_table
from dymoe.bench.simulate import format_report, simulate
from dymoe.bench.synthetic import build_expert_layer, build_synthetic, synthetic_config, tiny_config
from dymoe.bench.trace import Trace
from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.errors import InputError
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.presets import PRESETS
from dymoe.runtime.resident import ResidentExperts

SKEWED = SyntheticRouting("skewed")


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of row a's experts that are also in row b's."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def expected_overlap(p: float, k: int, e: int) -> float:
    """Each of k experts carried over with probability p, the other places drawn uniformly (s = 0)
    among the e - v experts not carried: v ~ Binomial(k, p), and each of the k - v new places finds
    one of the k - v experts not carried with chance (k - v) / (e - v)."""
    return sum(math.comb(k, v) * p**v * (1 - p) ** (k - v) * (v + (k - v) ** 2 / (e - v)) for v in range(k + 1)) / k


# ---- the process --------------------------------------------------------------------------------


def test_tables_depend_only_on_seed_layer_and_position():
    routes, guesses = route_table(SKEWED, 3, 5, 64, 8, 300)
    short_routes, short_guesses = route_table(SKEWED, 3, 5, 64, 8, 40)
    assert np.array_equal(routes[:40], short_routes) and np.array_equal(guesses[:40], short_guesses)
    again, _ = route_table(SKEWED, 3, 5, 64, 8, 300)
    assert np.array_equal(routes, again)
    assert not np.array_equal(routes, route_table(SKEWED, 4, 5, 64, 8, 300)[0])  # other seed
    assert not np.array_equal(routes, route_table(SKEWED, 3, 6, 64, 8, 300)[0])  # other layer
    for table in (routes, guesses):  # k distinct experts per position, sorted
        assert all(len(set(row)) == 8 for row in table.tolist())
        assert (np.diff(table, axis=1) > 0).all() and table.min() >= 0 and table.max() < 64


def test_popularity_is_zipf_over_a_per_layer_permutation():
    p0, p1 = popularity(SKEWED, 0, 0, 32), popularity(SKEWED, 0, 1, 32)
    assert abs(p0.sum() - 1) < 1e-12
    ranked = np.sort(p0)[::-1]
    assert np.allclose(ranked / ranked[0], np.arange(1, 33) ** -SKEWED.zipf)
    assert np.argmax(p0) != np.argmax(p1) or np.argmin(p0) != np.argmin(p1)  # layers differ
    flat = popularity(SyntheticRouting("skewed", zipf=0.0), 0, 0, 32)
    assert np.allclose(flat, 1 / 32)


def test_skew_the_hot_experts_take_most_uses():
    """With s = 1 over 64 experts, top-8: usage follows the popularity, not a uniform 1/64."""
    routes, _ = route_table(SKEWED, 0, 0, 64, 8, 4000)
    counts = np.bincount(routes.ravel(), minlength=64) / routes.size
    p = popularity(SKEWED, 0, 0, 64)
    hot = np.argsort(p)[::-1][:8]
    assert counts[hot].sum() > 0.3  # a uniform router would give the 8 hottest 12.5% of uses
    assert np.corrcoef(counts, p)[0, 1] > 0.9
    uniform, _ = route_table(SyntheticRouting("skewed", zipf=0.0, locality=0.0), 0, 0, 64, 8, 4000)
    flat = np.bincount(uniform.ravel(), minlength=64) / uniform.size
    assert flat.max() < 0.02 + 1 / 64


@pytest.mark.parametrize("r", [0.0, 0.5, 0.9, 1.0])
def test_locality_keeps_each_previous_expert_with_probability_r(r):
    """Kept share = r + (1 - r) x the chance that a redraw lands on the same expert again."""
    routing = SyntheticRouting("skewed", zipf=0.0, locality=r)
    routes, _ = route_table(routing, 1, 2, 64, 8, 3000)
    kept = overlap(routes[:-1], routes[1:])
    if r == 1.0:
        assert kept == 1.0
    else:
        assert abs(kept - expected_overlap(r, 8, 64)) < 0.015, kept


@pytest.mark.parametrize("q", [0.0, 0.5, 0.8, 1.0])
def test_predictor_sees_each_true_expert_with_probability_q(q):
    routing = SyntheticRouting("skewed", zipf=0.0, predictor_recall=q)
    routes, guesses = route_table(routing, 0, 3, 64, 8, 3000)
    recall = overlap(routes, guesses)
    if q == 1.0:
        assert recall == 1.0
    else:
        assert abs(recall - expected_overlap(q, 8, 64)) < 0.015, recall


def test_parse_routing_and_labels():
    assert parse_routing("uniform") == SyntheticRouting()
    assert parse_routing("skewed") == SKEWED
    custom = parse_routing("skewed:s=1.2,r=0.7,q=0.9")
    assert (custom.zipf, custom.locality, custom.predictor_recall) == (1.2, 0.7, 0.9)
    assert parse_routing(custom.spec) == custom
    assert "SYNTHETIC" in custom.label and "not a trained router" in custom.label and custom.spec in custom.label
    assert "near uniform" in SyntheticRouting().label
    for bad, message in (("zipf", "uniform or skewed"), ("skewed:x=1", "knobs are"), ("skewed:r=2", r"\[0, 1\]"),
                         ("uniform:s=1", "only skewed"), ("skewed:s=a", "not a number")):
        with pytest.raises(InputError, match=message):
            parse_routing(bad)


# ---- in the model -------------------------------------------------------------------------------


def tiny_skewed(name="qwen3-30b-a3b", layers=3, routing=SKEWED, context_len=64):
    config = tiny_config(synthetic_config(name, layers=layers))
    model, experts = build_synthetic(config, "cpu", torch.float32, seed=2, context_len=context_len,
                                     routing=routing)
    return config, model, experts


class Recorder:
    """An expert provider that remembers every layer's routing and runs the resident experts."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def run_experts(self, layer, hidden, ids, weights):
        self.calls.append((layer, ids.clone(), weights.clone()))
        return self.inner.run_experts(layer, hidden, ids, weights)


def test_prefill_routes_position_t_like_decode_at_t():
    config, model, experts = tiny_skewed()
    tokens = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    prefill = Recorder(ResidentExperts(experts))
    model.attach_experts(prefill)
    model(tokens, 0, model.new_cache(1))
    decode = Recorder(ResidentExperts(experts))
    model.attach_experts(decode)
    cache = model.new_cache(1)
    for t in range(12):
        model(tokens[:, t:t + 1], t, cache)
    for layer_index, layer in enumerate(config.moe_layers):
        full = prefill.calls[layer_index][1]
        steps = torch.cat([ids for l, ids, _ in decode.calls if l == layer])
        assert torch.equal(full.sort(-1).values, steps.sort(-1).values)
        table = model.model.layers[layer].mlp.gate.routes[:12]
        assert torch.equal(full.sort(-1).values, table)


def test_weights_are_the_real_routers_probabilities_of_the_chosen_experts():
    deepseek = tiny_config(synthetic_config("deepseek-v2-lite", layers=3))
    sigmoid = dataclasses.replace(deepseek, router_scoring="sigmoid", routed_scaling_factor=2.5)
    for name in ("qwen3-30b-a3b", "olmoe-1b-7b", sigmoid):  # norm_topk_prob true / false; DeepSeek-V3-style
        if isinstance(name, str):
            config, model, _ = tiny_skewed(name)
        else:
            config = name
            model, _ = build_synthetic(config, "cpu", torch.float32, seed=2, context_len=64, routing=SKEWED)
        gate = model.moe_blocks[0].gate
        model.routing_clock.set(5, 3)
        x = torch.randn(6, config.hidden_size, generator=torch.Generator().manual_seed(1))  # batch 2 x 3 tokens
        ids, weights = gate(x)
        assert torch.equal(ids.sort(-1).values, gate.routes[5:8].repeat(2, 1))
        logits = gate.logits(x).float()
        scores = torch.sigmoid(logits) if config.router_scoring == "sigmoid" else torch.softmax(logits, -1)
        probs = scores.gather(1, ids)
        expected = probs / probs.sum(-1, keepdim=True) if config.norm_topk_prob else probs
        expected = expected * config.routed_scaling_factor
        assert torch.allclose(weights, expected)
        assert (weights[:, :-1] >= weights[:, 1:]).all()  # router order: heaviest first
        assert not torch.allclose(weights[:3], weights[3:])  # they depend on the hidden state


def test_phi_moe_weights_are_sparsemixer_weights_of_the_chosen_experts():
    """Phi-MoE's router weighs the chosen experts with its masked softmaxes, largest logit first."""
    from dymoe.models.moe import sparsemixer_weights

    config = dataclasses.replace(tiny_config(synthetic_config("phi-3.5-moe", layers=2)), router_jitter_eps=0.5)
    model, _ = build_synthetic(config, "cpu", torch.float32, seed=2, context_len=64, routing=SKEWED)
    gate = model.moe_blocks[1].gate
    model.routing_clock.set(5, 3)
    x = torch.randn(6, config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids, weights = gate(x)
    assert torch.equal(ids.sort(-1).values, gate.routes[5:8].repeat(2, 1))
    logits = gate.logits(x)
    assert (logits.gather(1, ids)[:, 0] >= logits.gather(1, ids)[:, 1]).all()
    assert torch.equal(weights, sparsemixer_weights(logits, ids, 0.5))
    assert ((weights > 0) & (weights < 1)).any() and not torch.allclose(weights[:3], weights[3:])


def test_predict_defaults_to_forward_for_trained_routers():
    config = tiny_config(synthetic_config("mixtral-8x7b", layers=2))
    model, _ = build_synthetic(config, "cpu", torch.float32, context_len=16)
    gate = model.moe_blocks[1].gate
    x = torch.randn(4, config.hidden_size)
    assert all(torch.equal(a, b) for a, b in zip(gate.predict(x), gate(x)))
    assert model.routing_clock is None


def test_a_device_held_position_routes_like_the_host_one():
    """CUDA-graph decode (dymoe/models/decode_graphs.py) sets the clock with a position on the device."""
    supports_graphs = pytest.importorskip("dymoe.models.decode_graphs", exc_type=ImportError).supports_graphs
    config, model, _ = tiny_skewed()
    uniform = tiny_skewed(routing=SyntheticRouting())[1]
    assert supports_graphs(model) == supports_graphs(uniform)  # the clock is no obstacle
    gate = model.moe_blocks[1].gate
    x = torch.randn(1, config.hidden_size)
    model.routing_clock.set(9, 1)
    host = gate(x), gate.predict(x)
    model.routing_clock.set(SimpleNamespace(index=torch.tensor([9])), 1)
    device = gate(x), gate.predict(x)
    assert all(torch.equal(a, b) for pair in zip(host, device) for a, b in zip(*pair))


def test_position_beyond_the_table_is_a_clear_error():
    _, model, _ = tiny_skewed(context_len=8)
    model.routing_clock.set(7, 2)
    with pytest.raises(ValueError, match="8 positions"):
        model.moe_blocks[0].gate(torch.zeros(2, model.config.hidden_size))


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "qwen2-moe-a2.7b", "deepseek-v2-lite", "phi-3.5-moe"])
def test_offloaded_equals_resident_bit_for_bit_with_skewed_routing(name):
    """DESIGN.md invariant 2 with the skewed router: bf16 experts, several presets and budgets."""
    config = tiny_config(synthetic_config(name, layers=3))
    model, _ = build_synthetic(config, "cpu", torch.float32, seed=5, context_len=48, routing=SKEWED)
    bf16 = {l: build_expert_layer(config, l, "cpu", torch.bfloat16, seed=5) for l in config.moe_layers}
    store = MemoryStore.from_experts(bf16, precisions=["bf16"], group_size=64, pin=False)
    resident = ResidentExperts({l: (a.float(), b.float()) for l, (a, b) in bf16.items()})
    prompts = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))

    def run(provider):
        model.attach_experts(provider)
        prefill = model(prompts, 0, model.new_cache(2))
        cache = model.new_cache(1)
        logits = model(prompts[:1], 0, cache, last_only=True)[0]
        trail = [logits]
        for i in range(8):
            logits = model(logits.argmax().view(1, 1), 10 + i, cache, last_only=True)[0]
            trail.append(logits)
        return prefill, torch.stack(trail)

    reference = run(resident)
    one = store.layout("bf16").nbytes
    for budget in (config.num_experts_per_tok * one, 11 * one, len(config.moe_layers) * config.num_experts * one):
        for preset in ("on-demand", "lru", "lru-prefetch", "arc"):
            experts = OffloadedExperts(store, OffloadConfig(budget_bytes=budget, **PRESETS[preset]),
                                       config.num_experts_per_tok, "cpu", torch.float32)
            prefill, decode = run(experts)
            assert torch.equal(prefill, reference[0]) and torch.equal(decode, reference[1]), f"{preset} {budget}"


# ---- labelled everywhere --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def skewed_report(tmp_path_factory):
    trace = tmp_path_factory.mktemp("routing") / "skewed.trace"
    config = BenchConfig(model="synthetic:olmoe-1b-7b", tiny=True, layers=2, routing=SKEWED,
                         policies=("resident", "lru", "lru-prefetch"), budgets=("25%",), prompt_lens=(8, 24),
                         gen_len=24, device="cpu", progress=False, warmup=False)
    return run_bench(config, argv=["dymoe", "bench"], trace_path=trace), trace


def test_bench_table_json_and_trace_carry_the_label(skewed_report):
    report, path = skewed_report
    assert report["model"]["routing"] == SKEWED.label
    assert report["model"]["routing_config"]["spec"] == SKEWED.spec
    assert f"routing: {SKEWED.label}" in format_table(report)
    trace = Trace.load(path)
    assert trace.routing == SKEWED.label
    assert f"routing  {SKEWED.label}" in format_report(trace, [simulate(trace, "lru", 10**9)], ["pcie4x16"])


def test_bench_offloading_is_invisible_and_prefetch_recall_is_about_q(skewed_report):
    report, path = skewed_report
    for row in report["rows"][1:]:
        assert row["quality"]["top1_agreement"] == 1.0 and row["quality"]["kl_mean"] == 0.0
    recall = Trace.load(path).predictor_recall(1)
    q, chance = SKEWED.predictor_recall, 4 / 16  # tiny olmoe: top-4 of 16 experts
    assert all(q - 0.1 < r < q + (1 - q) * chance + 0.1 for r in recall.values()), recall


def test_routing_is_refused_for_checkpoints():
    with pytest.raises(InputError, match="--routing"):
        from dymoe.bench.harness import load_bench_model

        load_bench_model(BenchConfig(model="models/dymoe-demo-moe", routing=SKEWED), torch.device("cpu"),
                         torch.float32, 64)
