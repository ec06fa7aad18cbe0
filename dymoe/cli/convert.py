"""``dymoe convert``: write a model's routed experts into a multi-precision expert store.

Every routed expert of every MoE layer is written once per requested precision as one aligned blob
(so the runtime moves one expert with one copy), with an index of offsets and checksums. Running it
again is cheap: a complete store of the same model is left alone, and precisions missing from it are
added without rewriting the others.

The store goes to MODEL_DIR/dymoe-store when the model folder is writable, else to
~/.cache/dymoe/stores/<model folder name>-<hash>; --out puts it anywhere (e.g. on a faster SSD).
"""

from __future__ import annotations

import argparse

from dymoe.checkpoint.convert import convert_store
from dymoe.checkpoint.reader import Checkpoint
from dymoe.checkpoint.store import ExpertStore, default_store_dir
from dymoe.cli.units import format_bytes
from dymoe.errors import InputError
from dymoe.quant.formats import PRECISIONS, parse_format
from dymoe.quant.reference import ROUNDINGS

EXAMPLES = """examples:
  dymoe convert ~/models/Qwen3-30B-A3B
  dymoe convert ~/models/Mixtral-8x7B --out /mnt/nvme/mixtral-store --precisions bf16,int4,int2
  dymoe convert ~/models/OLMoE-1B-7B --precisions int3 --rounding hqq --verify
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="write the multi-precision expert store of a checkpoint", description=__doc__,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL_DIR",
                        help="Hugging Face checkpoint folder (config.json, *.safetensors)")
    parser.add_argument("--out", metavar="STORE", default=None,
                        help="store folder (default: MODEL_DIR/dymoe-store if writable, else under ~/.cache/dymoe)")
    parser.add_argument("--precisions", default="bf16,int4", metavar="LIST",
                        help=f"comma-separated, from {','.join(PRECISIONS)} (default: bf16,int4)")
    parser.add_argument("--group-size", type=int, default=128, choices=(64, 128),
                        help="weights per scale/min group of int4/int3/int2 (default: 128; 64 is more accurate "
                             "and about 6%% larger at int4)")
    parser.add_argument("--rounding", default="nearest", choices=ROUNDINGS,
                        help="nearest (fast) or hqq (half-quadratic refinement of each group's min: lower error, "
                             "most useful at int3/int2; slower to convert) (default: nearest)")
    parser.add_argument("--verify", action="store_true", help="re-read every blob and check its checksum afterwards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or messages")
    parser.set_defaults(func=run)


def parse_precisions(text: str, group_size: int) -> tuple[str, ...]:
    """``"bf16, int4"`` -> ("bf16", "int4"), each checked, so a typo fails before any work."""
    names = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    if not names:
        raise InputError(f"--precisions {text!r} names no precision: choose from {','.join(PRECISIONS)}")
    for name in names:
        parse_format(name, group_size)
    return names


def run(args) -> int:
    precisions = parse_precisions(args.precisions, args.group_size)
    checkpoint = Checkpoint.open(args.model)
    out = args.out if args.out is not None else default_store_dir(checkpoint.path)
    path = convert_store(checkpoint, out, precisions=precisions, group_size=args.group_size,
                         rounding=args.rounding, progress=not args.no_progress)
    store = ExpertStore.open(path, checkpoint=checkpoint)
    if args.verify:
        store.verify_all(progress=not args.no_progress)
    print(summary(store, verified=args.verify))
    return 0


def summary(store: ExpertStore, verified: bool) -> str:
    experts = len(store.layers) * store.num_experts
    sizes = ", ".join(f"{p} {format_bytes(store.nbytes(p))}" for p in store.precisions)
    checked = "; every checksum verified" if verified else ""
    return f"expert store {store.path}: {experts} experts x {len(store.precisions)} precisions ({sizes}){checked}"
