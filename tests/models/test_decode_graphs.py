"""The CUDA-graph decode path (dymoe/models/decode_graphs.py), run without recording on the CPU:
the same segments, device-held positions, span masks and expert-runtime calls as on the GPU, against
the plain forward."""

from __future__ import annotations

import pytest
import torch

from dymoe.checkpoint.reader import Checkpoint
from dymoe.models import decode_graphs
from dymoe.models.decode_graphs import DecodeGraphs, span_for, supports_graphs
from dymoe.models.transformer import load_dense
from dymoe.runtime.hotness import HotnessConfig, HotnessExperts
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
from dymoe.runtime.presets import PRESETS
from dymoe.runtime.resident import ResidentExperts
from tests.tiny_models import FAMILIES, make_hf_model, open_store, save_checkpoint

PROMPT = torch.tensor([[1, 17, 42, 5, 63, 8, 29, 11]])
STEPS = 14  # positions 8..21: across the spans 8 -> 16 -> 32 with MIN_SPAN patched to 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    return {f: Checkpoint.open(save_checkpoint(make_hf_model(f, seed=5), root / f)) for f in FAMILIES}


def decode_both(model, experts):
    """Greedy decode with the plain forward and with the segmented path, each on its own cache."""
    model.attach_experts(experts)
    return decode_side_by_side(model, model)


def decode_side_by_side(eager_model, segment_model, observe=lambda: None):
    """PROMPT prefilled on a cache of each model (equal logits asserted), then STEPS greedy steps:
    the plain forward on ``eager_model``, the segmented path on ``segment_model``, both fed the
    eager tokens; ``observe`` runs after the prefill and after each step. Returns (eager logits,
    segmented logits, the DecodeGraphs)."""
    eager_cache, graph_cache = eager_model.new_cache(1), segment_model.new_cache(1)
    logits = eager_model(PROMPT, 0, eager_cache, last_only=True)[0]
    assert torch.equal(segment_model(PROMPT, 0, graph_cache, last_only=True)[0], logits)
    graphs = DecodeGraphs(segment_model, graph_cache, record=False)
    eager, segmented = [], []
    token = logits.argmax()
    observe()
    for i in range(STEPS):
        position = PROMPT.shape[1] + i
        eager.append(eager_model(token.view(1, 1), position, eager_cache, last_only=True)[0])
        segmented.append(graphs.step(token, position))
        observe()
        token = eager[-1].argmax()
    return torch.stack(eager), torch.stack(segmented), graphs


@pytest.mark.parametrize("family", FAMILIES)
def test_segmented_decode_equals_the_forward(checkpoints, family, monkeypatch):
    monkeypatch.setattr(decode_graphs, "MIN_SPAN", 8)
    checkpoint = checkpoints[family]
    model = load_dense(checkpoint, 40, "cpu", torch.float32)
    assert supports_graphs(model), (f"{family}: every attention module must accept a StaticPosition "
                                    f"(dymoe/models/layers.py) so that decode runs in CUDA graphs")
    plain, segmented, graphs = decode_both(model, ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.float32))
    torch.testing.assert_close(segmented, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(segmented.argmax(-1), plain.argmax(-1))
    assert sorted(graphs.positions) == [16, 32]  # positions 8..21 need spans 16 and 32
    assert graphs.whole  # the resident runtime never synchronises: one recording per step


def test_longrope_steps_read_their_lengths_table_and_rerun_at_the_switch(tmp_path, monkeypatch):
    """Phi-MoE whose LongRoPE sets differ, switching at 12 tokens: steps at positions 8..11 read the
    short rows, the step at 12 re-runs the sequence eagerly (as the forward does), later steps
    read the long rows; every step equals the plain forward."""
    monkeypatch.setattr(decode_graphs, "MIN_SPAN", 8)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 12,
            "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
            "short_mscale": 1.1, "long_mscale": 1.3}
    checkpoint = Checkpoint.open(save_checkpoint(make_hf_model("phimoe", seed=5, rope_parameters=rope), tmp_path))
    model = load_dense(checkpoint, 40, "cpu", torch.float32)
    assert model.rotary.switch == 12
    plain, segmented, _ = decode_both(model, ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.float32))
    torch.testing.assert_close(segmented, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(segmented.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("preset", ["lru", "dymoe"])
def test_segmented_decode_drives_an_offloading_runtime_once_per_moe_layer(checkpoints, tmp_path, monkeypatch, preset):
    """lru (one precision class) and dymoe (two) are split: decode_prepare between segments,
    decode_compute inside the next one, decode_finish after it."""
    monkeypatch.setattr(decode_graphs, "MIN_SPAN", 8)
    checkpoint = checkpoints["qwen2_moe"]  # shared experts: finish() adds them after the runtime
    store = open_store(checkpoint, tmp_path / "store", ("bf16", "int4"))
    model = load_dense(checkpoint, 40, "cpu", torch.float32)
    c = checkpoint.config
    budget = c.num_experts_per_tok * (store.layout("bf16").nbytes + store.layout("int4").nbytes) * 2
    experts = OffloadedExperts(store, OffloadConfig(budget_bytes=budget, **PRESETS[preset]), c.num_experts_per_tok,
                               "cpu", torch.float32)
    calls = []
    for name in ("run_experts", "decode_prepare", "decode_compute", "decode_finish"):
        method = getattr(experts, name)
        setattr(experts, name, lambda layer, *args, m=method, n=name, **kw: calls.append((n, layer)) or m(layer, *args, **kw))
    plain, segmented, graphs = decode_both(model, experts)
    torch.testing.assert_close(segmented, plain, rtol=1e-5, atol=1e-5)
    assert not graphs.whole and graphs.deferred
    layers = list(c.moe_layers)
    plain_step = [("run_experts", layer) for layer in layers]
    split = [(n, layer) for layer in layers for n in ("decode_prepare", "decode_compute", "decode_finish")]
    # the prefill (twice), then per step the plain forward and the segmented path
    assert calls[: 2 * len(layers)] == plain_step * 2
    assert calls[2 * len(layers):] == (plain_step + split) * STEPS


# Two-class runtimes (3 MoE layers, top-3 of 8): (family, store precisions, knobs over the preset,
# high-precision slots beyond one token's top-k per class).
MIXED = {
    "dymoe": ("qwen3_moe", ("bf16", "int4"), dict(), 1),  # the preset: the first and last MoE layer critical
    # no depth floor and a tight budget: resident copies serve at the other precision both ways
    "dymoe-substitute": ("qwen3_moe", ("bf16", "int4"), dict(critical_layers=()), 2),
    "dymoe-critical": ("qwen3_moe", ("bf16", "int4"), dict(critical_layers=(1,)), 3),  # the middle layer all bf16
    "fate": ("qwen3_moe", ("int4", "int2"), dict(), 2),  # decode runs int4 only: int2 is never launched
    # biased experts with a clamped activation (the fused kernels compute those too)
    "dymoe-gpt-oss": ("gpt_oss", ("bf16", "int4"), dict(), 1),
}


@pytest.fixture(scope="module")
def mixed_stores(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed-stores")
    return {(f, p): open_store(checkpoints[f], root / f / "-".join(p), p)
            for f, p in {(family, precisions) for family, precisions, _, _ in MIXED.values()}}


class AdmissionLog:
    """Wraps a runtime's ``_admit``: per decode layer step, each expert's (wanted, used) class, the
    precision rule's choice against the class it ran at (they differ where a copy substituted)."""

    def __init__(self, experts):
        self.experts, self.admit, self.steps, self.rows = experts, experts._admit, [], []
        experts._admit = self

    def __call__(self, layer, hidden, ids, weights, row=None):
        self.rows.append(row is not None)  # read from the segment's recording (routing_row)
        ran, used = self.admit(layer, hidden, ids, weights, row)
        e = self.experts
        mixed = e.rule.decode_mixed and layer not in e._critical
        n_high = int(e.rule.decode_high(weights)) if mixed else len(ran)
        wanted = {x: e.precision if j < n_high else e.low for j, x in enumerate(ran)}
        self.steps.append((layer, [(wanted[x], used[x]) for x in ran]))
        return ran, used

    def count(self, wanted: str, used: str) -> int:
        return sum(pair == (wanted, used) for _, pairs in self.steps for pair in pairs)

    def classes(self, layer: int) -> set[str]:
        return {u for step_layer, pairs in self.steps if step_layer == layer for _, u in pairs}


@pytest.mark.parametrize("name", MIXED)
def test_two_class_decode_runs_inside_the_segments(checkpoints, mixed_stores, monkeypatch, name):
    """A two-class runtime's expert compute is deferred into the graph segments (each class's k
    slots and 0/1 mask in fixed rows) and gives the eager decode's logits at every step. Two
    runtimes of the same config, one per path and fed the same tokens, keep the same cache states,
    so substitutions happen alike in both (one runtime shared by both paths would not)."""
    monkeypatch.setattr(decode_graphs, "MIN_SPAN", 8)
    family, precisions, knobs, spare = MIXED[name]
    checkpoint, store = checkpoints[family], mixed_stores[family, precisions]
    c = checkpoint.config
    k = c.num_experts_per_tok
    preset = "fate" if name == "fate" else "dymoe"
    budget = k * sum(store.layout(p).nbytes for p in precisions) + spare * store.layout(precisions[0]).nbytes
    config = OffloadConfig(budget_bytes=budget, **{**PRESETS[preset], **knobs})
    eager_model, segment_model = (load_dense(checkpoint, 40, "cpu", torch.float32) for _ in range(2))
    eager_model.attach_experts(OffloadedExperts(store, config, k, "cpu", torch.float32))
    experts = OffloadedExperts(store, config, k, "cpu", torch.float32)
    segment_model.attach_experts(experts)
    log = AdmissionLog(experts)
    eager, segmented, graphs = decode_side_by_side(eager_model, segment_model)
    assert experts.deferred_decode and graphs.deferred and not graphs.whole
    torch.testing.assert_close(segmented, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(segmented.argmax(-1), eager.argmax(-1))
    assert len(log.steps) == STEPS * len(c.moe_layers)  # every decode layer step went through decode_prepare
    assert all(log.rows)  # with its routing row (guesses, count of high experts) made in the segment
    high, low = config.precisions
    if name == "fate":
        assert log.count(high, high) == STEPS * len(c.moe_layers) * k  # decode: int4 only
        return
    assert any(len({u for _, u in pairs}) == 2 for _, pairs in log.steps)  # a token split between the classes
    critical = {c.moe_layers[i] for i in config.critical_layers}
    for layer in critical:
        assert log.classes(layer) == {high}, layer
    if name == "dymoe-substitute":
        assert log.count(high, low) > 0 and log.count(low, high) > 0  # substitution both ways


def test_span_covers_the_position_in_powers_of_two_up_to_the_context():
    assert [span_for(p, 4096) for p in (0, 255, 256, 511, 512, 3000, 4095)] == [256, 256, 512, 512, 1024, 4096, 4096]
    assert span_for(700, 1000) == 1000


def test_a_tracing_provider_is_never_recorded_whole(checkpoints):
    """The trace recorder reads routing back to the host each step, so it must run between graph
    segments even around the resident experts (whose own decode is recorded whole)."""
    from dymoe.bench.trace import TracingExperts

    checkpoint = checkpoints["qwen3_moe"]
    model = load_dense(checkpoint, 40, "cpu", torch.float32)
    model.attach_experts(ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.float32))
    model.attach_experts(TracingExperts.around(model))
    assert not DecodeGraphs(model, model.new_cache(1), record=False).whole


def test_a_runtime_can_opt_out_of_graph_decode(checkpoints):
    checkpoint = checkpoints["qwen3_moe"]
    model = load_dense(checkpoint, 40, "cpu", torch.float32)
    resident = ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.float32)
    model.attach_experts(resident)
    assert supports_graphs(model)
    resident.decode_graphs = False
    assert not supports_graphs(model)


# dynaexq (3 MoE layers, top-3 of 8, every expert's int4 copy): (bf16 slots, int4 slots); fewer int4
# slots than the 24 experts is the fallback, whose int4 tier is fetched on demand too
HOTNESS = {"dynaexq": (6, 24), "dynaexq-fallback": (3, 12)}


@pytest.mark.parametrize("name", HOTNESS)
def test_dynaexq_decode_runs_inside_the_segments(checkpoints, mixed_stores, monkeypatch, name):
    """dynaexq's expert compute is deferred into the segments (each class's k slots and 0/1 mask in
    fixed rows) and gives the eager decode's logits at every step, while promotions land and high
    copies are demoted between the steps. Two runtimes of the same config, one per path and fed the
    same tokens, keep the same cache states."""
    monkeypatch.setattr(decode_graphs, "MIN_SPAN", 8)
    checkpoint, store = checkpoints["qwen3_moe"], mixed_stores["qwen3_moe", ("bf16", "int4")]
    c = checkpoint.config
    k = c.num_experts_per_tok
    n_high, n_low = HOTNESS[name]
    budget = n_high * store.layout("bf16").nbytes + n_low * store.layout("int4").nbytes
    config = HotnessConfig(budget_bytes=budget, decay=0.5, interval=2)  # hotness that moves: demotions
    eager_model, segment_model = (load_dense(checkpoint, 40, "cpu", torch.float32) for _ in range(2))
    eager_experts = HotnessExperts(store, config, k, "cpu", torch.float32)
    experts = HotnessExperts(store, config, k, "cpu", torch.float32)
    assert experts.pool.counts == {"bf16": n_high, "int4": n_low}
    eager_model.attach_experts(eager_experts)
    segment_model.attach_experts(experts)
    assert supports_graphs(segment_model)  # the fallback too (3-4x faster than eager on the H100)
    prepared = []
    prepare = experts.decode_prepare
    experts.decode_prepare = lambda layer, *args: prepared.append(layer) or prepare(layer, *args)
    high_copies = []  # the bf16 copies resident after the prefill and after each step

    def record():
        high_copies.append(set(experts.cache.resident("bf16")))

    eager, segmented, graphs = decode_side_by_side(eager_model, segment_model, record)
    assert experts.deferred_decode and graphs.deferred and not graphs.whole
    torch.testing.assert_close(segmented, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(segmented.argmax(-1), eager.argmax(-1))
    assert prepared == list(c.moe_layers) * STEPS  # every decode layer step went through decode_prepare
    assert experts.precision_uses == eager_experts.precision_uses
    assert experts.precision_uses["bf16"] > 0 and experts.precision_uses["int4"] > 0
    assert experts.stats()["total"]["prefetches"] > 0  # promotions
    assert any(before - after for before, after in zip(high_copies, high_copies[1:]))  # demotions
    if experts.fallback:
        assert experts.stats()["total"]["missed_bytes"] > 0  # int4 copies fetched (and waited for) on demand


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])  # (DeepSeek: dense layers before the MoE ones)
def test_every_residual_add_runs_with_the_norm_after_it(checkpoints, family, monkeypatch):
    """Where the fused add-and-norm applies (a GPU), a token's every residual add is one launch with
    the norm after it: per layer the add before the input norm (the layer before's MLP output, left
    unadded) and the add after attention; then the last MLP's add with the final norm: 2 per layer,
    in the plain forward and in each segmented decode step alike, with the logits unchanged. Here
    the fused kernel is stood in for by its torch definition, which records its calls."""
    from dymoe.models import layers

    monkeypatch.setattr(decode_graphs, "MIN_SPAN", 8)
    checkpoint = checkpoints[family]
    model = load_dense(checkpoint, 40, "cpu", torch.float32)
    model.attach_experts(ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.float32))
    reference = model(PROMPT, 0, model.new_cache(1), last_only=True)[0]
    calls = []

    def add_rms_norm(x, y, weight, eps):
        calls.append(tuple(x.shape))
        h = x + y
        h32 = h.float()
        return h, weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)

    monkeypatch.setattr(layers, "add_rms_norm_applies", lambda x, y, weight: True)
    monkeypatch.setattr(layers, "add_rms_norm", add_rms_norm)
    cache = model.new_cache(1)
    logits = model(PROMPT, 0, cache, last_only=True)[0]
    layer_count = checkpoint.config.num_layers
    assert torch.equal(logits, reference) and len(calls) == 2 * layer_count
    graphs = DecodeGraphs(model, cache, record=False)
    for position in range(PROMPT.shape[1], PROMPT.shape[1] + 3):
        calls.clear()
        token = logits.argmax()
        logits = graphs.step(token, position)
        assert len(calls) == 2 * layer_count and set(calls) == {(1, 1, checkpoint.config.hidden_size)}
