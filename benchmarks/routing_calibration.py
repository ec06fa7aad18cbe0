"""Fit the skewed synthetic routing (dymoe/bench/routing.py) to a trained model's routing trace.

One command (CPU, about a minute with the demo model)::

    python benchmarks/routing_calibration.py --trace demo.trace

``--trace`` is a trace recorded from a trained model (``dymoe simulate demo.trace --record
models/dymoe-demo-moe --prompts tests/data/heldout_snippet.txt --gen-len 64``; recorded first when
the file is missing and ``--record`` names the model). It prints, per MoE layer, what the trained
router does (share of a token's experts that the previous token of the same sequence also chose,
against the share two independent draws from the layer's usage would share; the share of uses of
the hottest expert; how many experts hold 90% of the uses), then the LRU and Belady hit rates at
25% and 50% of the experts for the trained trace and for synthetic skewed routing over a grid of
(s, r), on the trace's shape. Every trace is replayed one token per step (so prefill and decode
count alike and the synthetic chain, one long sequence, compares with it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from dymoe.bench.routing import SyntheticRouting, route_table
from dymoe.bench.simulate import simulate
from dymoe.bench.trace import Trace


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="routing trace of a trained model")
    parser.add_argument("--record", type=Path, default=None, help="model folder to record --trace from if missing")
    parser.add_argument("--zipf", default="0.6,0.8,1.0,1.2", help="values of s to try")
    parser.add_argument("--locality", default="0.1,0.2,0.3,0.5", help="values of r to try")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def one_token_steps(trace: Trace, ids: torch.Tensor, sequence_positions) -> Trace:
    """``ids`` [L, T, k] as a trace of one-token calls (no predictions)."""
    calls = torch.tensor([[s, p, 1] for s, p in sequence_positions], dtype=torch.int64).view(-1, 3)
    predicted = torch.full((ids.shape[0], 1, ids.shape[1], ids.shape[2]), -1, dtype=torch.int16)
    return Trace(trace.header, calls, ids, torch.zeros(ids.shape), predicted, list(trace.layers))


def hit_rates(trace: Trace, shares=(0.25, 0.5)) -> list[float]:
    one = int(trace.header["expert_bytes"]["bf16"])
    slots = [int(share * len(trace.layers) * trace.num_experts) for share in shares]
    return [100 * simulate(trace, policy, n * one).hit_rate for n in slots for policy in ("lru", "belady")]


def layer_statistics(trace: Trace) -> list[str]:
    sequence = np.concatenate([[s] * n for s, _, n in trace.calls.tolist()])
    same = sequence[1:] == sequence[:-1]
    lines = [f"{'layer':>5} {'kept %':>7} {'chance %':>8} {'top %':>6} {'90% of uses':>12}"]
    for i, layer in enumerate(trace.layers):
        ids = trace.ids[i].long().numpy()
        kept = np.array([len(set(a) & set(b)) for a, b in zip(ids[:-1], ids[1:])])[same].mean() / trace.top_k
        usage = np.bincount(ids.ravel(), minlength=trace.num_experts) / ids.size
        chance = trace.top_k * (usage**2).sum()
        ranked = np.sort(usage)[::-1]
        cover = int(np.searchsorted(np.cumsum(ranked), 0.9)) + 1
        lines.append(f"{layer:>5} {100 * kept:>7.1f} {100 * chance:>8.1f} {100 * ranked[0]:>6.1f} "
                     f"{cover:>5}/{trace.num_experts:<6}")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.trace.exists():
        if args.record is None:
            sys.exit(f"{args.trace} does not exist: pass --record MODEL to record it")
        subprocess.run([sys.executable, "-m", "dymoe", "simulate", str(args.trace), "--record", str(args.record),
                        "--prompts", "tests/data/heldout_snippet.txt", "--gen-len", "64", "--device", "cpu"],
                       check=True, stdout=subprocess.DEVNULL)
    trained = Trace.load(args.trace)
    layers, tokens, k = trained.ids.shape
    experts = trained.num_experts
    print(f"{trained.describe()}\nrouting: {trained.routing}\n")
    print("\n".join(layer_statistics(trained)))
    steps = [(s, p + i) for s, p, n in trained.calls.tolist() for i in range(n)]
    header = f"\n{'routing':<24} {'lru@25%':>8} {'belady@25%':>10} {'lru@50%':>8} {'belady@50%':>10}"
    print(header)
    print(f"{'trained (this trace)':<24} " + _row(hit_rates(one_token_steps(trained, trained.ids, steps))))
    chain = [(0, t) for t in range(tokens)]
    for s in (float(x) for x in args.zipf.split(",")):
        for r in (float(x) for x in args.locality.split(",")):
            routing = SyntheticRouting("skewed", zipf=s, locality=r)
            tables = [route_table(routing, args.seed, layer, experts, k, tokens)[0] for layer in range(layers)]
            ids = torch.tensor(np.stack(tables), dtype=torch.int16)
            print(f"{routing.spec:<24} " + _row(hit_rates(one_token_steps(trained, ids, chain))))


def _row(rates: list[float]) -> str:
    lru25, belady25, lru50, belady50 = rates
    return f"{lru25:>8.1f} {belady25:>10.1f} {lru50:>8.1f} {belady50:>10.1f}"


if __name__ == "__main__":
    main()
