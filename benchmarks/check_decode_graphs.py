"""CUDA-graph decode against the eager forward, from the same KV cache, on the GPU.

One command: ``python benchmarks/check_decode_graphs.py --out $OUT``.

Builds a synthetic real-shape model (random weights, :mod:`dymoe.bench.synthetic`), runs one
prefill, copies its KV cache, then decodes the same tokens (the eager path's greedy choices) once
with the eager forward and once with :meth:`MoETransformer.decode` (CUDA graphs), for the resident
experts and for offloading presets. Prefill is shared, so the two paths differ only in the decode
arithmetic: the graph path attends over a masked power-of-two span of the cache with the
efficient-attention kernel where the eager path attends over the exact prefix. The decode crosses a
span boundary (prompt 500, 40 steps: spans 512 and 1024). Prints per preset the largest logit
difference relative to the logits' range, the argmax agreement and both median step times; the
JSON goes to ``OUT/check_decode_graphs.json``. CPU smoke run: ``--device cpu --tiny`` (no graphs
there: it checks the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dymoe.bench.harness import sync
from dymoe.bench.synthetic import build_dense, build_expert_layer, synthetic_config, tiny_config
from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.runtime.presets import preset_precisions, preset_provider
from dymoe.runtime.resident import ResidentExperts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--policies", default="resident,lru,static-int4,dymoe,fate")
    parser.add_argument("--budget", type=float, default=0.25, help="share of the bf16 expert bytes")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="float32 separates a real difference between the paths from bf16 rounding")
    return parser.parse_args(argv)


def decode(model, cache, tokens, start: int, graphs: bool, device):
    model.cuda_graphs = graphs
    logits, times = [], []
    for i, token in enumerate(tokens):
        sync(device)
        t0 = time.perf_counter()
        out = model.decode(token.view(1), start + i, cache)
        sync(device)
        times.append(time.perf_counter() - t0)
        logits.append(out.clone())
    return torch.stack(logits), statistics.median(times[2:])


def check(model, provider, prompt, steps, device, tokens=None) -> dict:
    model.attach_experts(provider)
    cache = model.new_cache(1)
    first = model(prompt.view(1, -1), 0, cache, last_only=True)[0]
    saved = (cache.k.clone(), cache.v.clone())
    if tokens is None:  # the eager greedy choices, fed to both paths
        tokens = [first.argmax()]
        model.cuda_graphs = False
        for i in range(steps - 1):
            tokens.append(model.decode(tokens[-1].view(1), prompt.numel() + i, cache).argmax())
        tokens = torch.stack(tokens)
        cache.k.copy_(saved[0])
        cache.v.copy_(saved[1])
    eager, eager_s = decode(model, cache, tokens, prompt.numel(), False, device)
    cache.k.copy_(saved[0])
    cache.v.copy_(saved[1])
    graphs, graph_s = decode(model, cache, tokens, prompt.numel(), True, device)
    scale = eager.amax(-1) - eager.amin(-1)
    rel = ((graphs - eager).abs().amax(-1) / scale).max().item()
    agree = (graphs.argmax(-1) == eager.argmax(-1)).float().mean().item()
    return {"max_rel_diff": rel, "argmax_agreement": agree, "eager_ms": eager_s * 1e3, "graph_ms": graph_s * 1e3,
            "tokens": tokens}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = synthetic_config(args.shape, layers=args.layers)
    if args.tiny:
        config = tiny_config(config)
    context = args.prompt + args.steps + 8
    dtype = getattr(torch, args.dtype)
    model = build_dense(config, device, dtype, seed=0, context_len=context)
    experts = {l: build_expert_layer(config, l, device, dtype, seed=0) for l in config.moe_layers}
    policies = args.policies.split(",")
    precisions = tuple(dict.fromkeys(["bf16"] + [p for policy in policies if policy != "resident"
                                                 for p in preset_precisions(policy)]))
    store = MemoryStore.from_experts(experts, precisions=precisions, group_size=128, pin=device.type == "cuda")
    budget = int(args.budget * store.nbytes("bf16"))
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).to(device)
    results, tokens = {}, None
    for name in policies:
        if name == "resident":
            provider = ResidentExperts(experts)
        else:  # dynaexq's HotnessExperts too
            provider = preset_provider(store, name, budget, config.num_experts_per_tok, device, dtype)
        results[name] = check(model, provider, prompt, args.steps, device, tokens)
        tokens = results[name].pop("tokens")
        del provider
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "check_decode_graphs.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                                       "results": results}, indent=1))
    print(f"{args.shape} x {config.num_layers} layers, prompt {args.prompt}, {args.steps} steps, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"{'preset':<14}{'max rel diff':>14}{'argmax agree':>14}{'eager ms':>10}{'graph ms':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['max_rel_diff']:>14.2e}{r['argmax_agreement']:>14.3f}{r['eager_ms']:>10.2f}"
              f"{r['graph_ms']:>10.2f}")
    return results


if __name__ == "__main__":
    main()
