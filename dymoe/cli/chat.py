"""``dymoe chat``: an interactive conversation using the model's chat template.

Type a message and press Enter; ``/reset`` starts over, ``/exit`` (or Ctrl-D) leaves. The whole
conversation is re-encoded each turn, so it must fit in the context (``--context-len``).
"""

from __future__ import annotations

import argparse
import sys

from dymoe.cli.options import add_model_options, add_sampling_options, load_engine, open_model, sampling_params
from dymoe.engine.streaming import stream_text
from dymoe.errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat", help="chat interactively", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser)
    add_sampling_options(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    parser.set_defaults(func=run)


def run(args) -> int:
    params = sampling_params(args)
    checkpoint, tokenizer = open_model(args)
    tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])  # fail now if there is no template
    engine = load_engine(args, checkpoint, tokenizer)
    messages = _fresh(args.system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = _fresh(args.system)
            continue
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        try:
            engine.check_prompt(len(prompt_ids))
        except InputError as exc:
            print(f"error: {exc} (type /reset to start over)", file=sys.stderr)
            messages.pop()
            continue
        reply = []
        for piece in stream_text(tokenizer, engine.generate(prompt_ids, params), params.stop):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        if interactive:
            print(f"[{engine.stats.summary()}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})


def _fresh(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []
