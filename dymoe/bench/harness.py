"""The ``dymoe bench`` harness: every policy preset on the same prompts, side by side, in one process.

For one model (a checkpoint folder, or ``synthetic:NAME``: a published shape with random weights
built in memory, :mod:`dymoe.bench.synthetic`) and each prompt length, ``resident`` runs first: a
prefill (TTFT) and ``gen_len - 1`` greedy decode steps, each timed between device
synchronisations. Every other preset, at every budget, then runs the same prompt and is fed the
resident's tokens (teacher forcing), so its next-token distribution is compared with the
resident's at every position (:mod:`dymoe.bench.quality`) and one near-tie flip does not send the
rest of the sequence elsewhere.

An offloading preset keeps one provider (one slot pool) for all prompt lengths, shortest first,
so its cache is warm from the previous prompt, as in a server; the runtime counters (hits, bytes,
stalls, prefetches) are those of the decode steps only, summed over the prompt lengths.

The report is a JSON-able dict (:func:`run_bench`) with the exact command, date, device and
measured pinned host-to-device bandwidth; :func:`format_table` prints it.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import dymoe
from dymoe.bench.quality import Agreement, compare
from dymoe.bench.routing import SyntheticRouting
from dymoe.bench.synthetic import build_dense, build_expert_layer, parse_model_spec, synthetic_config, tiny_config
from dymoe.bench.trace import TRAINED_ROUTING, TracingExperts, expert_bytes, trace_header
from dymoe.cli.units import parse_bytes, parse_share
from dymoe.engine.engine import resolve_device, resolve_dtype
from dymoe.errors import InputError
from dymoe.runtime.metrics import LayerCounters
from dymoe.runtime.presets import HOTNESS_PRESETS, PRESETS, preset_precisions, preset_provider
from dymoe.runtime.resident import ResidentExperts

REFERENCE = "resident"
BENCH_POLICIES = (REFERENCE, *PRESETS, *HOTNESS_PRESETS)
COUNTERS = ("hits", "misses", "prefetch_hits", "prefetches", "missed_bytes", "h2d_bytes", "stall_seconds",
            "evictions", "tokens")


@dataclass(frozen=True)
class BenchConfig:
    """One ``dymoe bench`` run (the CLI maps its flags onto this)."""

    model: str  # checkpoint folder or synthetic:NAME
    policies: tuple[str, ...] = (REFERENCE, "on-demand", "lru", "static-int4")
    budgets: tuple[str, ...] = ("25%",)  # sizes ("6GiB") or shares of the bf16 expert bytes ("25%")
    prompt_lens: tuple[int, ...] = (32, 512, 2048)
    gen_len: int = 128
    layers: int | None = None  # synthetic models only: keep the first N layers
    tiny: bool = False  # synthetic models only: toy widths (CPU smoke runs, tests)
    routing: SyntheticRouting = SyntheticRouting()  # synthetic models only: uniform, or skewed (bench/routing.py)
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    group_size: int = 128
    text: Path | None = None  # checkpoints only: prompts are the first tokens of this file (default: random ids)
    store: Path | None = None  # checkpoints only: the expert store folder
    progress: bool = True
    warmup: bool = True
    cuda_graphs: bool = True  # decode replays CUDA graphs on a GPU (--eager: off)

    def __post_init__(self):
        unknown = [p for p in self.policies if p not in BENCH_POLICIES]
        if unknown or not self.policies:
            raise InputError(f"--policies {','.join(self.policies)}: choose from {', '.join(BENCH_POLICIES)}")
        if not self.prompt_lens or min(self.prompt_lens) < 1:
            raise InputError(f"--prompt-len needs positive lengths, got {self.prompt_lens}")
        if self.gen_len < 2:
            raise InputError(f"--gen-len must be at least 2 (the prefill's token and one decode step), "
                             f"got {self.gen_len}")
        if not self.budgets and any(p != REFERENCE for p in self.policies):
            raise InputError("--device-memory: give at least one budget for the offloading presets")

    @property
    def offloading(self) -> tuple[str, ...]:
        return tuple(p for p in self.policies if p != REFERENCE)


@dataclass
class BenchModel:
    """A model ready to bench: the dense part, its resident experts and a factory of offloaded ones."""

    name: str
    model: object  # MoETransformer with no experts attached yet
    resident: ResidentExperts
    offloaded: Callable[[str, int], object]  # (preset, budget bytes) -> expert provider
    bf16_expert_bytes: int  # all routed experts as bf16 blobs (what a percentage budget is a share of)
    bf16_blob_bytes: int  # one expert
    tokenizer: object | None = None
    info: dict = field(default_factory=dict)


# ---- building the model -----------------------------------------------------------------------


def load_bench_model(config: BenchConfig, device: torch.device, dtype: torch.dtype, context_len: int) -> BenchModel:
    shape = parse_model_spec(config.model)
    if shape is not None:
        return load_synthetic(shape, config, device, dtype, context_len)
    if config.layers is not None or config.tiny or config.routing.skewed:
        raise InputError("--layers, --tiny and --routing apply to synthetic:NAME models only, not to a checkpoint "
                         "folder (whose trained routers route as they were trained)")
    return load_checkpoint(config, device, dtype, context_len)


def load_synthetic(shape: str, config: BenchConfig, device, dtype, context_len: int) -> BenchModel:
    """Random weights in memory. Experts are drawn in bf16 (the store's top precision); the resident
    copy is the same values in ``dtype``, so an offloaded bf16 preset computes the same function."""
    from dymoe.checkpoint.memory_store import MemoryStore

    model_config = synthetic_config(shape, layers=config.layers)
    if config.tiny:
        model_config = tiny_config(model_config)
    _check_context(context_len, model_config.max_position_embeddings, config.model)
    model = build_dense(model_config, device, dtype, seed=config.seed, context_len=context_len,
                        routing=config.routing)
    experts = {l: build_expert_layer(model_config, l, device, torch.bfloat16, seed=config.seed)
               for l in model_config.moe_layers}
    needed = {q for p in config.offloading for q in preset_precisions(p)}
    precisions = sorted({"bf16", *needed}, key=_precision_order)
    store = MemoryStore.from_experts(experts, precisions=precisions, group_size=config.group_size,
                                     pin=device.type == "cuda")
    resident = ResidentExperts({l: tuple(t.to(dtype) for t in stacks) for l, stacks in experts.items()})
    del experts

    def offloaded(preset: str, budget: int):
        return preset_provider(store, preset, budget, model_config.num_experts_per_tok, device, dtype)

    blob = store.layout("bf16").nbytes
    label = SPEC_LABEL.format(shape=shape, layers=model_config.num_layers, tiny=" (tiny widths)" if config.tiny else "")
    return BenchModel(label, model, resident, offloaded, store.nbytes("bf16"), blob,
                      info={"kind": "synthetic", "shape": shape, "layers": model_config.num_layers,
                            "tiny": config.tiny, "weights": "random normal(0, 0.02), seed %d" % config.seed,
                            "routing": config.routing.label, "routing_config": config.routing.to_dict(),
                            "store_precisions": list(precisions)})


SPEC_LABEL = "synthetic:{shape} x {layers} layers{tiny}"


def load_checkpoint(config: BenchConfig, device, dtype, context_len: int) -> BenchModel:
    from dymoe.checkpoint.reader import Checkpoint
    from dymoe.engine.tokenizer import Tokenizer
    from dymoe.models.transformer import load_dense
    from dymoe.runtime.presets import RuntimeConfig, build_offloaded

    checkpoint = Checkpoint.open(Path(config.model))
    _check_context(context_len, checkpoint.config.max_position_embeddings, config.model)
    tokenizer = Tokenizer.from_dir(config.model) if config.text else None
    model = load_dense(checkpoint, context_len, device, dtype)
    resident = ResidentExperts.from_checkpoint(checkpoint, device, dtype)

    def offloaded(preset: str, budget: int):
        runtime = RuntimeConfig(policy=preset, device_memory=budget, store=config.store, group_size=config.group_size,
                                progress=config.progress)
        return build_offloaded(checkpoint, runtime, preset, device, dtype)

    c = checkpoint.config
    blob = expert_bytes(c, config.group_size)["bf16"]
    return BenchModel(Path(config.model).name, model, resident, offloaded, blob * len(c.moe_layers) * c.num_experts,
                      blob, tokenizer, info={"kind": "checkpoint", "path": str(config.model), "family": c.family,
                                             "layers": c.num_layers})


def _check_context(context_len: int, maximum: int, model: str) -> None:
    if context_len > maximum:
        raise InputError(f"--prompt-len + --gen-len need {context_len} positions, but {model} allows {maximum}: "
                         f"shorten them")


def _precision_order(precision: str) -> tuple[int, str]:
    return (0 if precision == "bf16" else 1, precision)


def parse_budget(text: str, model: BenchModel) -> int:
    """A size (``6GiB``) or a share of every expert's bf16 bytes (``25%``, rounded down to whole experts)."""
    share = parse_share(text, "--device-memory")
    if share is not None:
        experts = int(share * model.bf16_expert_bytes / model.bf16_blob_bytes)
        return experts * model.bf16_blob_bytes
    return parse_bytes(text, "--device-memory")


def make_prompts(config: BenchConfig, model: BenchModel) -> dict[int, torch.Tensor]:
    """One prompt per length: random token ids (seeded), or the first tokens of ``config.text``."""
    device = model.model.lm_head.weight.device
    if config.text is not None:
        if model.tokenizer is None:
            raise InputError("--text needs a checkpoint folder with a tokenizer; synthetic models take random ids")
        ids = model.tokenizer.encode(Path(config.text).read_text(encoding="utf-8"))
        if len(ids) < max(config.prompt_lens):
            raise InputError(f"--text {config.text} has {len(ids)} tokens; --prompt-len asks for "
                             f"{max(config.prompt_lens)}")
        return {n: torch.tensor(ids[:n], device=device) for n in sorted(config.prompt_lens)}
    generator = torch.Generator().manual_seed(config.seed)
    vocab = model.model.config.vocab_size
    return {n: torch.randint(0, vocab, (n,), generator=generator).to(device) for n in sorted(config.prompt_lens)}


# ---- timing one preset ------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pinned_h2d_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float | None:
    """Pinned host -> device copy bandwidth in bytes/s (median of 10 after 2 warm-ups); None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return nbytes / statistics.median(times[2:])


@dataclass
class PromptRun:
    """One prompt through one provider: timings, the tokens fed or chosen, the logits of each position."""

    ttft_s: float
    step_s: list[float]
    tokens: torch.Tensor  # [gen_len] greedy choices (resident) or the forced reference tokens
    logits: torch.Tensor  # [gen_len, V] float32: after the prefill, then after each decode step
    metrics: dict | None  # decode-phase runtime counters (offloading providers)


def run_prompt(model, provider, prompt: torch.Tensor, gen_len: int, forced: torch.Tensor | None = None,
               tick: Callable[[], None] = lambda: None) -> PromptRun:
    """Prefill ``prompt`` then ``gen_len - 1`` decode steps, greedy or fed ``forced`` tokens."""
    device = prompt.device
    model.attach_experts(provider)
    cache = model.new_cache(1)
    logits = torch.empty(gen_len, model.config.vocab_size, dtype=torch.float32, device=device)
    tokens = torch.empty(gen_len, dtype=torch.long, device=device)
    sync(device)
    started = time.perf_counter()
    out = model(prompt.view(1, -1), 0, cache, last_only=True)[0]
    token = out.argmax()
    sync(device)
    ttft = time.perf_counter() - started
    metrics = getattr(provider, "metrics", None)
    if metrics is not None:
        provider.stats()  # collect the prefill's pending stall timings before dropping them
        metrics.reset()
    logits[0].copy_(out)
    tokens[0] = forced[0] if forced is not None else token
    steps = []
    for i in range(1, gen_len):
        feed = tokens[i - 1]
        sync(device)
        t0 = time.perf_counter()
        out = model.decode(feed, prompt.numel() + i - 1, cache)
        token = out.argmax()
        sync(device)
        steps.append(time.perf_counter() - t0)
        logits[i].copy_(out)
        tokens[i] = forced[i] if forced is not None else token
        tick()
    stats = provider.stats()["total"] if metrics is not None else None
    return PromptRun(ttft, steps, tokens, logits, stats)


def add_counters(total: dict | None, part: dict | None) -> dict | None:
    if part is None:
        return total
    total = total or {k: 0 for k in COUNTERS}
    return {k: total[k] + part[k] for k in COUNTERS}


# ---- the whole run ----------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """Where and with what a report was made: versions, device, and every ``DYMOE_*`` setting in the
    environment (they pick kernel paths, so two reports compare only with the same ones)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    try:
        from importlib.metadata import version
        triton = version("triton")
    except Exception:  # not installed (the gpu extra), or no metadata
        triton = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton, "dymoe": dymoe.__version__, "device": str(device), "gpu": gpu,
            "cpu": platform.processor() or platform.machine(),
            "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DYMOE_")}}


def run_bench(config: BenchConfig, argv: list[str] | None = None, trace_path: Path | None = None) -> dict:
    """Run every preset of ``config`` and return the report (see the module docstring)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    context_len = max(config.prompt_lens) + config.gen_len + 8
    bench = load_bench_model(config, device, dtype, context_len)
    bench.model.cuda_graphs = config.cuda_graphs
    budgets = {text: parse_budget(text, bench) for text in config.budgets} if config.offloading else {}
    prompts = make_prompts(config, bench)
    bandwidth = pinned_h2d_bandwidth(device)
    if config.warmup:  # kernels, cuBLAS handles, allocator: not part of the first preset's figures
        run_prompt(bench.model, bench.resident, prompts[min(prompts)], 4)
    runs = [(REFERENCE, None)] + [(p, b) for b in budgets for p in config.offloading]
    progress = _progress(config, len(runs) * len(prompts) * (config.gen_len - 1))
    reference: dict[int, PromptRun] = {}
    rows = []
    try:
        for preset, budget_text in runs:
            progress.set_description(preset if budget_text is None else f"{preset}@{budget_text}")
            provider = bench.resident if budget_text is None else bench.offloaded(preset, budgets[budget_text])
            rows.append(_run_row(bench.model, provider, preset, budget_text, budgets.get(budget_text), prompts,
                                 config.gen_len, reference, progress.update))
            del provider
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        progress.close()
    report = {
        "command": shlex.join(argv if argv is not None else sys.argv),
        "environment": environment(device), "dtype": str(dtype).removeprefix("torch."),
        "h2d_bytes_per_s": bandwidth, "model": {"name": bench.name, **bench.info},
        "bf16_expert_bytes": bench.bf16_expert_bytes, "bf16_blob_bytes": bench.bf16_blob_bytes,
        "budgets": budgets, "prompt_lens": sorted(prompts), "gen_len": config.gen_len,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "rows": rows,
    }
    if trace_path is not None:
        report["trace"] = str(record_reference_trace(bench, prompts, reference, trace_path, config))
    return report


def _run_row(model, provider, preset, budget_text, budget, prompts, gen_len, reference, tick) -> dict:
    quality, counters, steps, ttft = Agreement(), None, [], {}
    for n, prompt in prompts.items():
        forced = reference[n].tokens if n in reference else None
        run = run_prompt(model, provider, prompt, gen_len, forced, tick)
        logits = run.logits
        if n not in reference:  # the reference keeps log-probabilities, the form compare() reads
            run.logits = F.log_softmax(run.logits, dim=-1)
            reference[n] = run
        quality.add(compare(reference[n].logits, reference[n].tokens, logits))
        counters = add_counters(counters, run.metrics)
        steps += run.step_s
        ttft[str(n)] = run.ttft_s
    row = summarise(preset, budget_text, budget, ttft, steps, counters, quality)
    mapped = getattr(provider, "mapped_decode", None)
    if mapped is not None:  # which decode ran: DYMOE_MAPPED_DECODE=auto decides per runtime
        row["mapped_decode_steps"] = mapped.steps
    return row


def summarise(preset, budget_text, budget, ttft: dict, steps: list[float], counters: dict | None,
              quality: Agreement) -> dict:
    """One table row: timings, runtime figures per decode token, quality against the reference."""
    tpot = statistics.median(steps)
    decode_s = sum(steps)
    row = {"preset": preset, "budget": budget_text, "budget_bytes": budget, "ttft_s": ttft,
           "tpot_median_s": tpot, "tpot_mean_s": statistics.fmean(steps), "tokens_per_s": 1 / tpot,
           "decode_steps": len(steps), "decode_s": decode_s, "quality": quality.to_dict(), "counters": counters}
    if counters is not None:
        c = LayerCounters(**counters)
        uses = c.hits + c.misses
        row.update(hit_rate=c.hit_rate, h2d_bytes_per_token=c.h2d_bytes / len(steps),
                   missed_bytes_per_token=c.missed_bytes / len(steps),
                   stall_share=c.stall_seconds / decode_s if decode_s else 0.0,
                   prefetch_precision=c.prefetch_hits / c.prefetches if c.prefetches else None,
                   prefetch_share=c.prefetch_hits / uses if uses else 0.0)
    return row


def record_reference_trace(bench: BenchModel, prompts, reference: dict[int, PromptRun], path: Path,
                           config: BenchConfig) -> Path:
    """Replay the resident's runs (its own greedy tokens) through a :class:`TracingExperts` and save
    the routing trace (untimed: tracing copies routing to the host every layer)."""
    model = bench.model
    tracer = TracingExperts(bench.resident, {block.layer: block.gate for block in model.moe_blocks})
    for i, (n, prompt) in enumerate(prompts.items()):
        if i:
            tracer.start_sequence()
        run_prompt(model, tracer, prompt, config.gen_len, reference[n].tokens)
    engine_like = _EngineView(model, "resident")
    recipe = {"prompts": len(prompts), "prompt_tokens": sorted(prompts), "gen_len": config.gen_len,
              "sampling": "greedy", "source": "dymoe bench", "prompt_ids": "text" if config.text else "random"}
    trace = tracer.to_trace(trace_header(engine_like, bench.name, recipe,
                                         routing=bench.info.get("routing", TRAINED_ROUTING)))
    return trace.save(path)


@dataclass
class _EngineView:
    """What :func:`~dymoe.bench.trace.trace_header` reads from an engine."""

    model: object
    preset: str

    @property
    def config(self):
        return self.model.config

    @property
    def device(self):
        return self.model.lm_head.weight.device


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(config: BenchConfig, total: int):
    if not config.progress:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False, file=sys.stderr)


# ---- printing ---------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    """The report as a fixed-width table, one row per (preset, budget), with a header that says
    what was run and where."""
    env = report["environment"]
    bw = report["h2d_bytes_per_s"]
    lens = report["prompt_lens"]
    head = [
        f"{report['model']['name']}; bf16 experts {report['bf16_expert_bytes'] / 2**30:.2f} GiB; "
        f"{report['dtype']} on {env['gpu'] or env['device']}"
        + (f"; pinned H2D {bw / 1e9:.1f} GB/s" if bw else ""),
        "budgets: " + (", ".join(f"{k} = {v / 2**30:.2f} GiB" for k, v in report["budgets"].items()) or "-")
        + f"; prompts {','.join(map(str, lens))} tokens, {report['gen_len']} generated (teacher-forced with "
        f"resident's tokens)",
    ]
    if report["model"].get("routing"):
        head.append(f"routing: {report['model']['routing']}")
    columns = ([("preset", 22)] + [(f"TTFT@{n} ms", max(9, len(str(n)) + 8)) for n in lens]
               + [("TPOT ms", 8), ("tok/s", 7), ("hit %", 6), ("H2D MiB/tok", 11), ("stall %", 7),
                  ("pf prec", 7), ("pf use %", 8), ("top1", 6), ("ppl", 8), ("KL", 8)])
    lines = head + ["", " ".join(f"{name:>{w}}" if i else f"{name:<{w}}" for i, (name, w) in enumerate(columns))]
    lines.append("-" * len(lines[-1]))
    for row in report["rows"]:
        lines.append(" ".join(f"{v:>{w}}" if i else f"{v:<{w}}"
                              for i, (v, (_, w)) in enumerate(zip(_cells(row, lens), columns))))
    if any(row["preset"] in HOTNESS_PRESETS for row in report["rows"]):
        lines += ["", *DYNAEXQ_FOOTNOTE]
    return "\n".join(lines)


# what a dynaexq row's runtime columns mean (dymoe/runtime/hotness.py's docstring)
DYNAEXQ_FOOTNOTE = (
    "dynaexq: hit % = expert uses served by a landed bf16 promotion; the others ran on int4 copies (a miss moves",
    "  nothing while every int4 copy fits; else a stderr line says so and a missing copy is fetched on demand).",
    "  H2D = promotions (its prefetches) + those fetches, not the start-up load of the int4 copies; stall % =",
    "  waits for those fetches (on CPU, where copies are synchronous, promotions count too).",
)


def _cells(row: dict, lens) -> list[str]:
    name = row["preset"] if row["budget"] is None else f"{row['preset']}@{row['budget']}"
    q = row["quality"]
    offloaded = row["counters"] is not None
    pf = row.get("prefetch_precision")
    return ([name] + [f"{row['ttft_s'][str(n)] * 1e3:.1f}" for n in lens]
            + [f"{row['tpot_median_s'] * 1e3:.2f}", f"{row['tokens_per_s']:.1f}",
               f"{100 * row['hit_rate']:.1f}" if offloaded else "-",
               f"{row['h2d_bytes_per_token'] / 2**20:.2f}" if offloaded else "0",
               f"{100 * row['stall_share']:.1f}" if offloaded else "0",
               f"{pf:.2f}" if pf is not None else "-",
               f"{100 * row['prefetch_share']:.1f}" if offloaded else "-",
               f"{q['top1_agreement']:.3f}", f"{q['perplexity']:.3f}", f"{q['kl_mean']:.2e}"])
