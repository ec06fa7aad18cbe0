"""``dymoe calibrate``: measure which MoE layers are sensitive to low precision (DyMoE's depth floors).

Writes a schedule (JSON) that ``--schedule`` hands to the ``dymoe`` preset: its critical layers never
run below bf16. Sensitivity is the mean KL divergence from the exact model on your text when only
that layer's experts are low-bit.

example:
  dymoe calibrate -m MODEL --text sample.txt --critical 2 --out MODEL/dymoe-schedule.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dymoe.cli.options import add_model_options, load_engine, open_model
from dymoe.errors import InputError
from dymoe.runtime.calibrate import calibrate


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="per-layer low-precision sensitivity -> a DyMoE schedule", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser)
    parser.add_argument("--text", type=Path, required=True, help="calibration text (a few hundred tokens or more)")
    parser.add_argument("--low", default="int4", choices=("int8", "int4", "int3", "int2"),
                        help="the low precision to test each layer at (default: int4)")
    parser.add_argument("--group-size", type=int, default=128, choices=(64, 128))
    parser.add_argument("--critical", type=int, default=2, help="how many layers to keep at bf16 (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens of the text to use (default: 512)")
    parser.add_argument("--out", type=Path, default=None, help="schedule file (default: MODEL/dymoe-schedule.json)")
    parser.set_defaults(func=run, policy="resident")


def run(args) -> int:
    if not args.text.is_file():
        raise InputError(f"--text {args.text} does not exist")
    checkpoint, tokenizer = open_model(args)
    if args.critical < 0 or args.critical > len(checkpoint.config.moe_layers):
        raise InputError(f"--critical must be between 0 and {len(checkpoint.config.moe_layers)}, got {args.critical}")
    args.policy = "resident"
    engine = load_engine(args, checkpoint, tokenizer)
    ids = tokenizer.encode(args.text.read_text())[: args.max_tokens]
    schedule = calibrate(engine.model, engine.model.experts, ids, args.low, args.group_size, args.critical,
                         progress=lambda layer, kl: print(f"layer {layer:>3}: KL {kl:.5f}", file=sys.stderr))
    out = args.out or Path(args.model) / "dymoe-schedule.json"
    schedule.save(out)
    layers = sorted(schedule.sensitivity)
    print(f"critical layers (bf16 only): {[layers[i] for i in schedule.critical_layers]}; schedule written to {out}")
    return 0
