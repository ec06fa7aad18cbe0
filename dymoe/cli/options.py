"""Flags shared by the sub-commands that run a model, and their mapping onto frozen configs.

Only the CLI reads flags; everything below it receives an :class:`EngineConfig` or a
:class:`SamplingParams`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dymoe.checkpoint.reader import Checkpoint
from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.engine.tokenizer import Tokenizer
from dymoe.cli.units import parse_bytes, parse_share
from dymoe.errors import InputError
from dymoe.runtime.presets import POLICY_NAMES, RuntimeConfig


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("-m", "--model", required=True, type=Path,
                       help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    group.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N (default: auto)")
    group.add_argument("--dtype", default="auto",
                       help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32 (default: auto)")
    group.add_argument("--context-len", type=int, default=None,
                       help="tokens of context to allocate (default: min(model maximum, 4096))")
    group.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    group.add_argument("--eager", action="store_true",
                       help="decode without CUDA graphs (slower; for debugging and comparisons)")
    group.add_argument("--no-warmup", dest="warm_up", action="store_false",
                       help="on a GPU, skip the throwaway token at load that compiles the kernels and records "
                            "the decode graphs (the first request then pays for them)")
    runtime = parser.add_argument_group("expert runtime")
    runtime.add_argument("--policy", default="auto", choices=POLICY_NAMES,
                         help="expert policy preset (default: auto = resident if all experts fit in "
                              "--device-memory, else lru)")
    runtime.add_argument("--device-memory", "--expert-budget", dest="device_memory", metavar="SIZE", default=None,
                         help="device memory for routed experts: a size (6GiB) or a share of the experts' bf16 "
                              "bytes (25%%, whole experts) (default: no limit, all resident)")
    runtime.add_argument("--host-memory", metavar="SIZE", default=None,
                         help="pinned host RAM for the expert store on GPU runs (default: up to half the free RAM)")
    runtime.add_argument("--schedule", type=Path, default=None,
                         help="depth floors from `dymoe calibrate` for the dymoe preset (default: first and last layer)")
    runtime.add_argument("--policy-config", type=Path, default=None, metavar="FILE",
                         help="TOML (or .json) table of knobs overriding the preset's, e.g. "
                              "'prefetch_depth = 2' or 'important_mass = 0.7' (keys: see README, Policy knobs)")
    runtime.add_argument("--store", type=Path, default=None,
                         help="expert store folder (default: MODEL/dymoe-store, built on first use; see `dymoe convert`)")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the model's generation_config.json, else greedy)")
    group.add_argument("-n", "--max-new-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    group.add_argument("-t", "--temperature", type=float, default=None, help="0 = greedy")
    group.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    group.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1 = off)")
    group.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when this text is generated (repeatable)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    if args.context_len is not None and args.context_len < 2:
        raise InputError(f"--context-len must be at least 2, got {args.context_len}")
    share = parse_share(args.device_memory, "--device-memory") if args.device_memory else None
    size = args.device_memory if share is None else None
    runtime = RuntimeConfig(
        policy=args.policy,
        device_memory=parse_bytes(size, "--device-memory") if size else None,
        device_share=share,
        host_memory=parse_bytes(args.host_memory, "--host-memory") if args.host_memory else None,
        store=args.store, progress=not args.no_progress, schedule=args.schedule, policy_config=args.policy_config,
    )
    return EngineConfig(
        model_dir=args.model, device=args.device, dtype=args.dtype, context_len=args.context_len,
        progress=not args.no_progress, runtime=runtime, cuda_graphs=not args.eager, warm_up=args.warm_up,
    )


def generation_defaults(model_dir: Path) -> dict:
    """Sampling defaults a checkpoint ships in generation_config.json (only when it samples)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not raw.get("do_sample"):
        return {}
    keys = ("temperature", "top_k", "top_p", "repetition_penalty")
    return {k: raw[k] for k in keys if raw.get(k) is not None}


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    defaults = generation_defaults(args.model)
    chosen = {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
    }
    values = {k: (v if v is not None else defaults.get(k)) for k, v in chosen.items()}
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, seed=args.seed, stop=tuple(args.stop),
        **{k: v for k, v in values.items() if v is not None},
    )


def open_model(args: argparse.Namespace) -> tuple[Checkpoint, Tokenizer]:
    """Check the folder and its tokenizer first: cheap, and the errors come before a long load."""
    return Checkpoint.open(args.model), Tokenizer.from_dir(args.model)


def load_engine(args: argparse.Namespace, checkpoint: Checkpoint, tokenizer: Tokenizer) -> Engine:
    return Engine.load(engine_config(args), eos_token_ids=tokenizer.eos_token_ids, checkpoint=checkpoint)
