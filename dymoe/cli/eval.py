"""``dymoe eval``: perplexity of a model on a text file, under any expert policy.

The file is tokenized whole and scored in consecutive windows of the context length (every token
but the first predicted once), so users can check quality on their own data, and compare a
low-precision preset with ``resident`` on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dymoe.bench.quality import perplexity
from dymoe.cli.options import add_model_options, load_engine, open_model
from dymoe.errors import InputError

EXAMPLES = """examples:
  dymoe eval -m models/dymoe-demo-moe --text tests/data/heldout_snippet.txt
  dymoe eval -m models/dymoe-demo-moe --text my_notes.txt --policy static-int4 --device-memory 2MiB
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity of a model on a text file (chunked to the context)",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score")
    parser.add_argument("--window", type=int, default=None,
                        help="tokens per scored window (default: the context length, see --context-len)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_model_options(parser)
    parser.set_defaults(func=run)


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--text {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"--text {path} is not UTF-8 text") from None
    if not text.strip():
        raise InputError(f"--text {path} holds no text")
    return text


def run(args) -> int:
    text = read_text(args.text)
    checkpoint, tokenizer = open_model(args)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise InputError(f"--text {args.text} is {len(ids)} token long; perplexity needs at least 2")
    engine = load_engine(args, checkpoint, tokenizer)
    window = args.window or engine.model.context_len
    if not 1 <= window <= engine.model.context_len:
        raise InputError(f"--window {window} must be between 1 and the context length {engine.model.context_len}")
    ppl, scored = perplexity(engine.model, ids, window, progress=not args.no_progress)
    result = {"model": str(args.model), "text": str(args.text), "policy": engine.preset, "tokens": scored,
              "window": window, "perplexity": ppl}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.text}: {scored} tokens scored in windows of {window}, policy {engine.preset}: "
              f"perplexity {ppl:.4f}")
    return 0
