"""``dymoe simulate``: replay a routing trace under other policies, budgets and links, without a model.

A trace (``dymoe.bench.trace``) holds, for every token and MoE layer, the chosen experts and the
cross-layer predictor's guesses. The simulator replays it through the runtime's own cache and
eviction policies and prints hit rates, bytes moved and a modelled time per output token for each
link, next to the Belady-optimal (oracle) hit rate at the same budget. ``--record MODEL`` first
writes TRACE from a greedy run of the model over the prompts (all experts resident: at bf16,
offloading does not change the routing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dymoe.bench.simulate import LINKS, POLICIES, format_report, simulate
from dymoe.bench.trace import Trace, record_trace
from dymoe.cli.units import parse_bytes, parse_share
from dymoe.errors import InputError

EXAMPLES = """examples:
  dymoe simulate demo.trace --record models/dymoe-demo-moe --prompts tests/data/heldout_snippet.txt
  dymoe simulate demo.trace --policy lru,lfu --device-memory 25% --link pcie4x16,nvme
  dymoe simulate demo.trace --policy lru --device-memory 6MiB --compute-ms 0.5
"""
DEFAULT_PROMPTS = (
    "The Python interpreter",
    "A list comprehension consists of brackets containing an expression followed by a for clause",
    "import os\nfor name in os.listdir(path):",
    "Exceptions are raised when",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate", help="replay a routing trace: hit rates, bytes and modelled TPOT per policy and link",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("trace", type=Path, help="trace file (.safetensors); written first with --record")
    parser.add_argument("--policy", default="lru",
                        help=f"comma-separated presets to replay: {', '.join(p for p in POLICIES if p != 'belady')} "
                             f"(default: lru; the belady oracle is always added)")
    parser.add_argument("--device-memory", metavar="SIZE", default="25%",
                        help="device memory for expert slots: a size (6MiB, 8GiB) or a share of all experts' "
                             "bf16 bytes (25%%; default)")
    parser.add_argument("--link", default="all",
                        help=f"comma-separated links, or all: {', '.join(LINKS)} (default: all)")
    parser.add_argument("--compute-ms", type=float, default=0.0,
                        help="resident compute time per output token, the floor of the modelled TPOT (default: 0)")
    parser.add_argument("--expert-bytes", type=int, default=None,
                        help="bytes of one expert (default: the trace header's figure for the policy's precision)")
    record = parser.add_argument_group("recording a trace first")
    record.add_argument("--record", metavar="MODEL", type=Path, default=None,
                        help="Hugging Face checkpoint folder to run and record into TRACE")
    record.add_argument("--prompts", type=Path, default=None,
                        help="text file of prompts separated by blank lines (default: a few built-in prompts)")
    record.add_argument("--gen-len", type=int, default=32, help="tokens to generate per prompt, greedy (default: 32)")
    record.add_argument("--lookahead", type=int, default=1, help="predictor guesses for layers l+1..l+D (default: 1)")
    record.add_argument("--device", default="auto", help="device to record on (default: auto)")
    parser.set_defaults(func=run)


def read_prompts(path: Path | None) -> list[str]:
    """Prompts of a file, one per block of text between blank lines; the built-in ones without a file."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--prompts {path}: cannot read it ({exc.strerror})") from None
    prompts = [block.strip() for block in text.split("\n\n") if block.strip()]
    if not prompts:
        raise InputError(f"--prompts {path} holds no text")
    return prompts


def record(args) -> Trace:
    from dymoe.checkpoint.reader import Checkpoint
    from dymoe.engine.engine import Engine, EngineConfig
    from dymoe.engine.tokenizer import Tokenizer

    if args.gen_len < 1:
        raise InputError(f"--gen-len must be at least 1, got {args.gen_len}")
    checkpoint, tokenizer = Checkpoint.open(args.record), Tokenizer.from_dir(args.record)
    engine = Engine.load(EngineConfig(model_dir=args.record, device=args.device, progress=False),
                         eos_token_ids=tokenizer.eos_token_ids, checkpoint=checkpoint)
    prompts = [tokenizer.encode(p) for p in read_prompts(args.prompts)]
    trace = record_trace(engine, prompts, args.gen_len, lookahead=args.lookahead)
    trace.header["recipe"]["prompts_file"] = str(args.prompts) if args.prompts else "built-in"
    trace.save(args.trace)
    print(f"recorded {args.trace}: {trace.describe()}", file=sys.stderr)
    return trace


def budget_bytes(text: str, trace: Trace, expert_bytes: int | None = None) -> int:
    """``--device-memory``: a size, or a percentage of every expert's bytes (whole experts) at bf16,
    or at ``expert_bytes`` when ``--expert-bytes`` sets them."""
    share = parse_share(text, "--device-memory")
    if share is not None:
        experts = int(share * len(trace.layers) * trace.num_experts)
        return experts * (expert_bytes or int(trace.header["expert_bytes"]["bf16"]))
    return parse_bytes(text, "--device-memory")


def choices(text: str, known, flag: str) -> list[str]:
    names = list(known) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise InputError(f"{flag} {text!r}: choose from {', '.join(known)}")
    return names


def run(args) -> int:
    trace = record(args) if args.record is not None else Trace.load(args.trace)
    policies = [p for p in choices(args.policy, POLICIES, "--policy") if p != "belady"] + ["belady"]
    links = choices(args.link, LINKS, "--link")
    budget = budget_bytes(args.device_memory, trace, args.expert_bytes)
    results = [simulate(trace, p, budget, args.expert_bytes, compute_s_per_token=args.compute_ms / 1e3)
               for p in policies]
    print(format_report(trace, results, links))
    return 0
