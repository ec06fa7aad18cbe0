"""``dymoe demo``: the shipped demo model, all experts resident and then offloaded, side by side.

The demo model (``models/dymoe-demo-moe``: a small Qwen3-MoE trained on the Python documentation,
see its model card) is converted to an expert store on first use; then the same prompt runs with
every expert resident and with ``--policy`` under a device budget that holds a quarter of the
experts. At bf16 the two texts must be identical (offloading is invisible at full precision); the
statistics show what the budget cost: hit rate, bytes moved and time per token.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dymoe
from dymoe.checkpoint.reader import Checkpoint
from dymoe.checkpoint.blob import expert_blob_bytes
from dymoe.cli.units import format_bytes
from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.engine.tokenizer import Tokenizer
from dymoe.errors import CheckpointError
from dymoe.runtime.presets import PRESETS, RuntimeConfig

DEMO_MODEL = Path(dymoe.__file__).resolve().parent.parent / "models" / "dymoe-demo-moe"
PROMPT = "The Python interpreter"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the demo model resident and offloaded, side by side", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help=f"model folder (default: {DEMO_MODEL})")
    parser.add_argument("--prompt", default=PROMPT, help=f"prompt to complete (default: {PROMPT!r})")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=48)
    parser.add_argument("--policy", default="lru", choices=sorted(PRESETS), help="offloading preset (default: lru)")
    parser.add_argument("--budget-share", type=float, default=0.25,
                        help="device budget as a share of the bf16 expert bytes (default: 0.25)")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(func=run)


def quarter_budget(checkpoint: Checkpoint, share: float) -> tuple[int, int]:
    """Bytes for ``share`` of the experts at bf16 (whole experts), and how many experts that is."""
    c = checkpoint.config
    one = expert_blob_bytes(c, "bf16")
    count = max(c.num_experts_per_tok, int(share * len(c.moe_layers) * c.num_experts))
    return count * one, count


def run_once(path: Path, tokenizer: Tokenizer, runtime: RuntimeConfig, device: str, prompt: str, n: int):
    engine = Engine.load(EngineConfig(model_dir=path, device=device, progress=False, runtime=runtime),
                         eos_token_ids=tokenizer.eos_token_ids)
    ids = list(engine.generate(tokenizer.encode(prompt), SamplingParams(max_new_tokens=n)))
    return engine, tokenizer.decode(ids)


def run(args) -> int:
    if not (args.model / "config.json").exists():
        raise CheckpointError(f"the demo model is not at {args.model}: run `make demo` from a dymoe checkout "
                              f"or pass --model")
    checkpoint = Checkpoint.open(args.model)
    tokenizer = Tokenizer.from_dir(args.model)
    c = checkpoint.config
    budget, fits = quarter_budget(checkpoint, args.budget_share)
    total = len(c.moe_layers) * c.num_experts
    print(f"model   {args.model.name}: {c.family}, {c.num_layers} layers x {c.num_experts} experts (top-{c.num_experts_per_tok})")
    print(f"prompt  {args.prompt!r}\n")

    resident, text = run_once(args.model, tokenizer, RuntimeConfig(policy="resident"), args.device,
                              args.prompt, args.max_new_tokens)
    print(f"[resident: all {total} experts on the {resident.device.type}]")
    print(args.prompt + text)
    print(f"  {resident.stats.summary()}\n")

    runtime = RuntimeConfig(policy=args.policy, device_memory=budget, progress=False)
    offloaded, off_text = run_once(args.model, tokenizer, runtime, args.device, args.prompt, args.max_new_tokens)
    stats = offloaded.model.experts.stats()["total"]
    print(f"[{args.policy}: device budget {format_bytes(budget)} = {fits} of {total} experts, the rest in the store]")
    print(args.prompt + off_text)
    print(f"  {offloaded.stats.summary()}")
    print(f"  experts: hit rate {100 * stats['hit_rate']:.1f}%, {stats['misses']} fetched, "
          f"{format_bytes(stats['h2d_bytes'])} moved, {stats['evictions']} evictions\n")
    same = "identical" if off_text == text else "DIFFERENT (a bug: please report it)"
    print(f"offloaded text vs resident text: {same}")
    return 0 if off_text == text or PRESETS[args.policy]["precision"] != "bf16" else 1
