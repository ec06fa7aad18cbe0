"""``dymoe generate``: stream a completion for one prompt (argument or stdin)."""

from __future__ import annotations

import argparse
import sys

from dymoe.cli.options import add_model_options, add_sampling_options, load_engine, open_model, sampling_params
from dymoe.engine.streaming import stream_text
from dymoe.errors import InputError

EXAMPLES = """examples:
  dymoe generate -m ~/models/Qwen3-30B-A3B "The capital of France is"
  echo "Write a haiku about memory." | dymoe generate -m MODEL --chat -t 0.7 --seed 1
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text from a prompt", description=__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    add_model_options(parser)
    add_sampling_options(parser)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--stats", action="store_true", help="print runtime statistics at the end")
    parser.set_defaults(func=run)


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise InputError("no prompt: pass it as an argument or on standard input")
    return sys.stdin.read()


def run(args) -> int:
    prompt = read_prompt(args)
    params = sampling_params(args)
    checkpoint, tokenizer = open_model(args)
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(prompt)
    engine = load_engine(args, checkpoint, tokenizer)
    engine.check_prompt(len(prompt_ids))
    for piece in stream_text(tokenizer, engine.generate(prompt_ids, params), params.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(engine.stats.summary(), file=sys.stderr)
    if args.stats:
        print(engine.runtime_report(), file=sys.stderr)
    return 0
