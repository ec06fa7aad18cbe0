"""The ``dymoe`` command: one sub-command per module under :mod:`dymoe.cli`.

Each sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit status. User errors
(:class:`dymoe.errors.DymoeError`) end as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dymoe import __version__
from dymoe.errors import DymoeError

SUBCOMMANDS = ("generate", "chat", "inspect", "convert", "demo", "serve", "simulate", "bench", "eval", "calibrate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dymoe",
        description="Run Mixture-of-Experts models whose experts do not fit in device memory.",
    )
    parser.add_argument("--version", action="version", version=f"dymoe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"dymoe.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dymoe.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # (the sub-commands' imports read the DYMOE_* switches: a bad value is a user error)
        parser = build_parser()
    except DymoeError as exc:
        print(f"dymoe: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DymoeError as exc:
        print(f"dymoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
