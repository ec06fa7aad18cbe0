"""Quality and traffic of each preset on the trained demo model, against resident (CPU is enough).

``python benchmarks/demo_quality.py [--share 0.25] [--tokens 300] [--prefill 0]`` feeds the held-out
snippet (tests/data/heldout_snippet.txt) through the demo model under each preset at a device budget
of ``--share`` of its bf16 experts — the first ``--prefill`` tokens as one prompt (a many-token
step, where e.g. ``fate`` moves unpopular experts at int2), the rest token by token — and prints
perplexity, KL(resident || preset) and top-1 agreement with resident per position, hit rate, bytes
moved and how often each precision ran.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.tokenizer import Tokenizer
from dymoe.runtime.presets import PRESETS, RuntimeConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "dymoe-demo-moe"


def log_probs(ids: list[int], policy: str, budget: int | None, prefill: int = 0, store: Path | None = None):
    """Next-token log-probabilities at every position but the last: positions below ``prefill`` from
    one many-token forward, the rest one token at a time."""
    runtime = RuntimeConfig(policy=policy, device_memory=budget, progress=False, store=store)
    engine = Engine.load(EngineConfig(model_dir=DEMO, device="cpu", progress=False, runtime=runtime))
    model = engine.model
    cache = model.new_cache(1)
    rows = [model(torch.tensor([ids[:prefill]]), 0, cache)[0]] if prefill else []
    rows += [model(torch.tensor([[t]]), i, cache, last_only=True)[0][None]
             for i, t in enumerate(ids[:-1]) if i >= prefill]
    stats = model.experts.stats() if hasattr(model.experts, "stats") else None
    return torch.cat(rows).log_softmax(-1), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--prefill", type=int, default=0, help="tokens fed as one prompt before decoding")
    parser.add_argument("--policies", default="lru,lru-prefetch,static-int4,dymoe,fate-bf16,fate")
    parser.add_argument("--store", type=Path, help="expert store folder (default: next to the demo model)")
    parser.add_argument("--popularity-floor", type=float, help="fate: run prefill experts below this x the "
                        "balanced share of tokens at int2 (default: the preset's)")
    args = parser.parse_args()
    if args.popularity_floor is not None:  # this process only: the runtime reads presets by name
        PRESETS["fate"] = {**PRESETS["fate"], "popularity_floor": args.popularity_floor}
    tokenizer = Tokenizer.from_dir(DEMO)
    ids = tokenizer.encode((ROOT / "tests" / "data" / "heldout_snippet.txt").read_text())[: args.tokens]
    target = torch.tensor(ids[1:])
    budget = int(args.share * 6 * 32) * 98304  # whole bf16 experts of the demo model (96 KiB blobs)
    args.prefill = min(args.prefill, len(ids) - 1)
    reference, _ = log_probs(ids, "resident", None, args.prefill)

    def ppl(lp):
        return torch.exp(-lp[torch.arange(len(target)), target].mean()).item()

    print(f"demo model, {len(ids)} held-out tokens ({args.prefill} as one prompt), budget {args.share:.0%} of bf16 "
          f"experts ({budget / 2**20:.1f} MiB)")
    print(f"{'preset':<14} {'ppl':>7} {'KL':>8} {'top1':>6} {'hit %':>6} {'MiB moved':>10}  precision uses")
    print(f"{'resident':<14} {ppl(reference):>7.3f} {0:>8.4f} {1:>6.3f} {'-':>6} {0:>10.1f}")
    for policy in args.policies.split(","):
        lp, stats = log_probs(ids, policy, budget, args.prefill, args.store)
        kl = (reference.exp() * (reference - lp)).sum(-1).mean().item()
        top1 = (lp.argmax(-1) == reference.argmax(-1)).float().mean().item()
        t = stats["total"]
        print(f"{policy:<14} {ppl(lp):>7.3f} {kl:>8.4f} {top1:>6.3f} {100 * t['hit_rate']:>6.1f} "
              f"{t['h2d_bytes'] / 2**20:>10.1f}  {stats['precision_uses']}")


if __name__ == "__main__":
    main()
