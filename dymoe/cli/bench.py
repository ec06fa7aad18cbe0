"""``dymoe bench``: every policy preset on the same prompts in one process, printed as one table.

``resident`` runs first and is the reference: the other presets, at every ``--device-memory``
budget, are fed its greedy tokens (teacher forcing) and compared with it position by position
(top-1 agreement, perplexity of its continuation, KL). Timings are host wall time between device
synchronisations; runtime counters (hit rate, bytes, stalls, prefetches) are the decode steps'.
See :mod:`dymoe.bench.harness`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dymoe.bench.harness import BENCH_POLICIES, BenchConfig, format_table, run_bench
from dymoe.bench.routing import DEFAULT_LOCALITY, DEFAULT_PREDICTOR_RECALL, DEFAULT_ZIPF, parse_routing
from dymoe.errors import InputError

EXAMPLES = """examples:
  dymoe bench --model synthetic:qwen3-30b-a3b --layers 8 --device-memory 25%,50% --json out.json
  dymoe bench --model synthetic:mixtral-8x7b --layers 4 --policies resident,lru,static-int4
  dymoe bench --model synthetic:olmoe-1b-7b --layers 2 --routing skewed --record-trace olmoe.trace
  dymoe bench --model synthetic:qwen3-30b-a3b --layers 8 --routing skewed:s=1.2,r=0.7,q=0.9
  dymoe bench --model models/dymoe-demo-moe --text tests/data/heldout_snippet.txt --prompt-len 32,512 \\
      --policies resident,lru,lru-prefetch --device-memory 25%
"""
DEFAULT_POLICIES = "resident,on-demand,on-demand-prefetch,lru,lru-prefetch,static-int4,least-stale-int4"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time and compare policy presets side by side (TTFT, TPOT, hit rate, bytes, quality)",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", "-m", required=True,
                        help="checkpoint folder, or synthetic:NAME (a published shape with random weights, in memory)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help=f"comma-separated presets from {', '.join(BENCH_POLICIES)} (resident is always run "
                             f"first, as the reference; default: {DEFAULT_POLICIES})")
    parser.add_argument("--device-memory", metavar="SIZE[,SIZE]", default="25%",
                        help="device memory for expert slots, one or more comma-separated: sizes (6GiB) or shares "
                             "of all experts' bf16 bytes (25%%; default)")
    parser.add_argument("--prompt-len", default="32,512,2048",
                        help="comma-separated prompt lengths (default: 32,512,2048)")
    parser.add_argument("--gen-len", type=int, default=128, help="tokens generated per prompt (default: 128)")
    parser.add_argument("--layers", type=int, default=None, help="synthetic models: keep the first N layers")
    parser.add_argument("--tiny", action="store_true", help="synthetic models: toy widths (a CPU smoke run)")
    parser.add_argument("--routing", default="uniform", metavar="uniform|skewed[:s=S,r=R,q=Q]",
                        help="synthetic models: how experts are chosen. uniform (default): the random routers' own "
                             "choice, near uniform. skewed: a seeded stand-in for a trained router, labelled as "
                             f"such in every output: per-layer Zipf popularity with exponent s (default "
                             f"{DEFAULT_ZIPF:g}), each expert of the previous token kept with probability r "
                             f"(default {DEFAULT_LOCALITY:g}), and the cross-layer predictor shown each true expert "
                             f"with probability q (default {DEFAULT_PREDICTOR_RECALL:g}); weights still come from "
                             "the real router logits. Sources: docs/routing.md")
    parser.add_argument("--text", type=Path, default=None,
                        help="checkpoints: prompts are the first tokens of this file (default: random token ids)")
    parser.add_argument("--store", type=Path, default=None, help="checkpoints: expert store folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), bfloat16, float32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and random prompts")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="write the full report here")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                        help="draw TTFT, TPOT and hit rate per preset (needs the plot extra: pip install dymoe[plot])")
    parser.add_argument("--record-trace", type=Path, default=None, metavar="OUT.trace",
                        help="also write the resident run's routing trace (for dymoe simulate)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--eager", action="store_true", help="decode without CUDA graphs (to measure what they bring)")
    parser.set_defaults(func=run)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{flag} {text!r}: give comma-separated whole numbers, e.g. 32,512,2048") from None


def bench_config(args) -> BenchConfig:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "resident" not in policies:
        policies.insert(0, "resident")
    policies.sort(key=lambda p: p != "resident")
    return BenchConfig(
        model=args.model, policies=tuple(policies),
        budgets=tuple(b.strip() for b in args.device_memory.split(",") if b.strip()),
        prompt_lens=_ints(args.prompt_len, "--prompt-len"), gen_len=args.gen_len, layers=args.layers,
        tiny=args.tiny, routing=parse_routing(args.routing), device=args.device, dtype=args.dtype, seed=args.seed,
        text=args.text, store=args.store, progress=not args.no_progress, cuda_graphs=not args.eager,
    )


def run(args) -> int:
    config = bench_config(args)
    if args.plot is not None:
        from dymoe.bench.plot import require_matplotlib

        require_matplotlib()  # fail before the run, not after it
    report = run_bench(config, argv=["dymoe", *sys.argv[1:]] if sys.argv[0].endswith("dymoe") else sys.argv,
                       trace_path=args.record_trace)
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        from dymoe.bench.plot import plot_report

        plot_report(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
