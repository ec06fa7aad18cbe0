"""``dymoe demo``: build the demo model if needed and generate with it.

Until the trained demo model ships, the demo model is a small Qwen3-MoE checkpoint with RANDOM
weights (its text is gibberish) and a tokenizer trained on dymoe's own sources: it shows the whole
pipeline — loading a Hugging Face folder, the tokenizer and chat template, prefill and decode —
not language quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dymoe
from dymoe.bench.random_checkpoint import write_random_checkpoint
from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.engine.streaming import stream_text
from dymoe.engine.tokenizer import Tokenizer

DEFAULT_DIR = Path("demo-out") / "random-qwen3-moe"
PROMPT = "The expert runtime"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="build the demo model and generate with it", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"where the demo model lives (default: {DEFAULT_DIR})")
    parser.add_argument("--prompt", default=PROMPT, help="prompt to complete")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="auto")
    parser.set_defaults(func=run)


def ensure_demo_model(path: Path) -> Path:
    if (path / "model.safetensors").exists() and (path / "tokenizer.json").exists():
        return path
    print(f"building the untrained demo model in {path} ...")
    sources = sorted(Path(dymoe.__file__).parent.rglob("*.py"))
    return write_random_checkpoint(path, [p.read_text() for p in sources])


def run(args) -> int:
    path = ensure_demo_model(args.dir)
    tokenizer = Tokenizer.from_dir(path)
    engine = Engine.load(EngineConfig(model_dir=path, device=args.device, progress=False),
                         eos_token_ids=tokenizer.eos_token_ids)
    c = engine.config
    print(f"model: {path} — {c.family}, {c.num_layers} layers, {c.num_experts} experts (top-{c.num_experts_per_tok}), "
          f"RANDOM WEIGHTS (untrained: expect gibberish)")
    print(f"device: {engine.device}\n")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    print(args.prompt, end="", flush=True)
    for piece in stream_text(tokenizer, engine.generate(tokenizer.encode(args.prompt), params)):
        print(piece, end="", flush=True)
    print("\n")
    print(engine.stats.summary())
    return 0
