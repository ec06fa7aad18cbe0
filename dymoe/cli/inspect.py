"""``dymoe inspect``: what a checkpoint is and how much of it fits in a device budget.

Reads only config.json and the safetensors headers, so it is instant even for a 60 GB model.
"""

from __future__ import annotations

import argparse
import json

from dymoe.checkpoint.blob import expert_blob_bytes
from dymoe.checkpoint.reader import Checkpoint
from dymoe.cli.units import format_bytes, parse_bytes, parse_share
from dymoe.models.config import ModelConfig
from dymoe.runtime.presets import share_budget

PRECISIONS = ("bf16", "int8", "int4", "int2")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="describe a checkpoint and what fits in a memory budget", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="Hugging Face checkpoint folder")
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="device memory for experts, a size (8GiB, 24GB) or a share of the experts' bf16 "
                             "bytes (25%%): show how many experts fit")
    parser.add_argument("--group-size", type=int, default=128, choices=(64, 128),
                        help="group size of the int4/int2 formats (default: 128)")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    parser.set_defaults(func=run)


def describe(checkpoint: Checkpoint, budget: int | None, group_size: int) -> dict:
    c = checkpoint.config
    total_params = sum(_parameters(name, checkpoint.shape(name)) for name in checkpoint.tensor_names)
    n_experts = len(c.moe_layers) * c.num_experts
    expert_params = n_experts * c.expert_params
    dense_params = total_params - expert_params
    active = dense_params + len(c.moe_layers) * c.num_experts_per_tok * c.expert_params
    facts = {
        "architecture": c.family,
        "attention": attention_summary(c),
        "kv_cache_bytes_per_token_bf16": 2 * c.num_layers * c.num_kv_heads * (c.head_dim + c.v_head_dim),
        "layers": c.num_layers,
        "moe_layers": len(c.moe_layers),
        "experts_per_layer": c.num_experts,
        "experts_per_token": c.num_experts_per_tok,
        "hidden_size": c.hidden_size,
        "expert_width": c.moe_intermediate_size,
        "shared_expert_width": c.shared_expert_intermediate_size,
        "parameters": total_params,
        "active_parameters_per_token": active,
        "dense_parameters": dense_params,
        "expert_parameters": expert_params,
        "dense_bytes_bf16": 2 * dense_params,
        "expert_bytes_per_precision": {},
        "bytes_per_expert": {},
    }
    for p in PRECISIONS:
        one = expert_blob_bytes(c, p, group_size)
        facts["bytes_per_expert"][p] = one
        facts["expert_bytes_per_precision"][p] = one * n_experts
    if budget is not None:
        facts["device_memory"] = budget
        facts["experts_that_fit"] = {p: min(budget // b, n_experts) for p, b in facts["bytes_per_expert"].items()}
        facts["experts_total"] = n_experts
    return facts


def attention_summary(c: ModelConfig) -> str:
    """One phrase: the attention kind and its head shapes."""
    m = c.latent_attention
    if m is not None:
        return (f"multi-head latent (MLA), {c.num_heads} heads, kv_lora_rank {m.kv_lora_rank}, "
                f"q_lora_rank {m.q_lora_rank if m.q_lora_rank is not None else 'none'}")
    summary = f"grouped-query, {c.num_heads} query / {c.num_kv_heads} KV heads of {c.head_dim}"
    if c.attention_sinks:
        summary += ", attention sinks"
    if c.sliding_layers:
        summary += f", sliding window of {c.sliding_window} on {len(c.sliding_layers)} of {c.num_layers} layers"
    return summary


def _parameters(name: str, shape) -> int:
    """Weights a tensor holds: MXFP4 blocks (GPT-OSS's experts) pack two a byte, their scales none."""
    if name.endswith("_scales"):
        return 0
    return _numel(shape) * (2 if name.endswith("_blocks") else 1)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def render(facts: dict) -> str:
    lines = [
        f"architecture     {facts['architecture']}",
        f"attention        {facts['attention']}; KV cache "
        f"{format_bytes(facts['kv_cache_bytes_per_token_bf16'])} per token at bf16",
        f"layers           {facts['layers']} ({facts['moe_layers']} MoE), hidden {facts['hidden_size']}",
        f"experts          {facts['experts_per_layer']} per layer, top-{facts['experts_per_token']}, "
        f"width {facts['expert_width']}"
        + (f", shared expert width {facts['shared_expert_width']}" if facts["shared_expert_width"] else ""),
        f"parameters       {facts['parameters'] / 1e9:.3f} B total, {facts['active_parameters_per_token'] / 1e9:.3f} B "
        f"active per token",
        f"dense (resident) {facts['dense_parameters'] / 1e9:.3f} B params = {format_bytes(facts['dense_bytes_bf16'])} at bf16",
        f"routed experts   {facts['expert_parameters'] / 1e9:.3f} B params",
        "",
        "precision   per expert    all experts" + ("    fit in budget" if "experts_that_fit" in facts else ""),
    ]
    for p, one in facts["bytes_per_expert"].items():
        row = f"{p:<10} {format_bytes(one):>11}  {format_bytes(facts['expert_bytes_per_precision'][p]):>13}"
        if "experts_that_fit" in facts:
            fit = facts["experts_that_fit"][p]
            row += f"    {fit}/{facts['experts_total']} ({100 * fit / facts['experts_total']:.0f}%)"
        lines.append(row)
    if "device_memory" in facts:
        lines.append(f"\n(device budget for experts: {format_bytes(facts['device_memory'])})")
    return "\n".join(lines)


def run(args) -> int:
    checkpoint = Checkpoint.open(args.model)
    budget = None
    if args.device_memory:
        share = parse_share(args.device_memory, "--device-memory")
        budget = (parse_bytes(args.device_memory, "--device-memory") if share is None
                  else share_budget(checkpoint.config, share))
    facts = describe(checkpoint, budget, args.group_size)
    print(json.dumps(facts, indent=2) if args.json else render(facts))
    return 0
