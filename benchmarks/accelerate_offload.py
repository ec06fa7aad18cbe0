"""Peer baseline: transformers + accelerate CPU offloading of the synthetic Qwen3-30B-A3B shape.

One command on the GPU machine: ``python benchmarks/accelerate_offload.py --out $OUT``.

What a user of the Hugging Face stack would do with a model whose experts do not fit: load it with
a ``device_map`` that keeps attention, norms, routers, embeddings and the head on the GPU and puts
the routed experts on the CPU; accelerate's hooks then copy a layer's experts to the GPU for every
forward call and drop them after. The budget (``--budgets``, % of the bf16 expert bytes) keeps the
first layers' experts on the GPU (accelerate places whole modules, and transformers stores one
layer's experts as one module), as ``max_memory`` would. The weights are dymoe's synthetic ones
(``benchmarks/resident_decode.py`` builds the transformers model on the same tensors), so the
logits can be compared with dymoe's resident model: the first generated token must agree.

Timings as ``dymoe bench``: prefill (TTFT) per prompt length, then ``--gen-len - 1`` greedy decode
steps (median = TPOT), host wall time between device synchronisations.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resident_decode import hf_forward, hf_qwen3_moe  # noqa: E402  (the transformers twin of dymoe's model)

from dymoe.bench.harness import environment, pinned_h2d_bandwidth, sync  # noqa: E402
from dymoe.bench.synthetic import build_dense, build_expert_layer, synthetic_config, tiny_config  # noqa: E402

SHAPE = "qwen3-30b-a3b"
EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts$")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--budgets", default="25,50", help="comma-separated %% of the bf16 expert bytes")
    parser.add_argument("--prompt-len", default="32,512")
    parser.add_argument("--gen-len", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="toy widths (CPU smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def device_map(hf, gpu_expert_layers: int, device) -> dict[str, object]:
    """Every module on ``device`` but the routed experts of layers >= ``gpu_expert_layers`` (CPU)."""
    mapping: dict[str, object] = {}

    def place(prefix: str, module) -> None:
        match = EXPERTS.fullmatch(prefix)
        if match:
            mapping[prefix] = device if int(match.group(1)) < gpu_expert_layers else "cpu"
            return
        if not any(EXPERTS.fullmatch(f"{prefix}.{n}" if prefix else n) or
                   any(EXPERTS.fullmatch(f"{prefix}.{n}.{m}" if prefix else f"{n}.{m}")
                       for m, _ in child.named_modules() if m)
                   for n, child in module.named_children()):
            mapping[prefix] = device
            return
        for name, child in module.named_children():
            place(f"{prefix}.{name}" if prefix else name, child)
        for name, _ in module.named_parameters(recurse=False):
            mapping[f"{prefix}.{name}" if prefix else name] = device
        for name, _ in module.named_buffers(recurse=False):
            mapping[f"{prefix}.{name}" if prefix else name] = device

    place("", hf)
    return mapping


def build(args, device):
    config = synthetic_config(SHAPE, layers=args.layers)
    if args.tiny:
        config = tiny_config(config)
    lens = [int(x) for x in args.prompt_len.split(",")]
    model = build_dense(config, device, torch.bfloat16, seed=args.seed, context_len=max(lens) + args.gen_len + 8)
    # experts are drawn on the device (same values as dymoe bench's), then kept in host memory
    experts = {l: tuple(t.to("cpu") for t in build_expert_layer(config, l, device, torch.bfloat16, seed=args.seed))
               for l in config.moe_layers}
    return config, model, experts, lens


def time_run(hf, prompt: torch.Tensor, gen_len: int, device) -> dict:
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    with torch.inference_mode():
        sync(device)
        started = time.perf_counter()
        out = hf_forward(hf, cache, input_ids=prompt.view(1, -1), logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        sync(device)
        ttft = time.perf_counter() - started
        tokens, steps = [int(token)], []
        for _ in range(gen_len - 1):
            sync(device)
            t0 = time.perf_counter()
            out = hf_forward(hf, cache, input_ids=token.view(1, 1), logits_to_keep=1)
            token = out.logits[0, -1].argmax()
            sync(device)
            steps.append(time.perf_counter() - t0)
            tokens.append(int(token))
    return {"ttft_s": ttft, "step_s": steps, "tpot_median_s": statistics.median(steps), "tokens": tokens}


def first_token_of_dymoe(model, experts, prompt, device) -> int:
    """dymoe's resident next token for ``prompt`` (experts moved to the device one layer at a time)."""
    from dymoe.runtime.resident import ResidentExperts

    class OneLayerAtATime:
        def run_experts(self, layer, hidden, ids, weights):
            gate_up, down = (t.to(device) for t in experts[layer])
            return ResidentExperts({layer: (gate_up, down)}).run_experts(layer, hidden, ids, weights)

    model.attach_experts(OneLayerAtATime())
    return int(model(prompt.view(1, -1), 0, model.new_cache(1), last_only=True)[0].argmax())


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        from accelerate import dispatch_model
    except ImportError:
        sys.exit("benchmarks/accelerate_offload.py needs accelerate and transformers: pip install accelerate transformers")
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    config, model, experts, lens = build(args, device)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = {n: torch.randint(0, config.vocab_size, (n,), generator=generator).to(device) for n in sorted(lens)}
    reference = {n: first_token_of_dymoe(model, experts, p, device) for n, p in prompts.items()}
    results = []
    for share in (float(b) for b in args.budgets.split(",")):
        gpu_layers = int(share / 100 * len(config.moe_layers))  # whole layers: accelerate's granularity
        hf = hf_qwen3_moe(config, model, experts, torch.bfloat16)
        target = (device.index or 0) if device.type == "cuda" else "cpu"  # accelerate's spelling of a device
        hf = dispatch_model(hf, device_map=device_map(hf, gpu_layers, target), main_device=target)
        runs = {}
        for n, prompt in prompts.items():
            print(f"accelerate offload, {share:g}% budget ({gpu_layers} of {len(config.moe_layers)} layers' experts "
                  f"on the GPU), prompt {n} ...", flush=True)
            runs[n] = time_run(hf, prompt, args.gen_len, device)
        results.append({"budget_percent": share, "gpu_expert_layers": gpu_layers, "runs": runs,
                        "first_token_agrees": all(runs[n]["tokens"][0] == reference[n] for n in prompts)})
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    import accelerate
    import transformers

    report = {"command": " ".join(sys.argv), "environment": environment(device), "h2d_bytes_per_s":
              pinned_h2d_bandwidth(device), "accelerate": accelerate.__version__,
              "transformers": transformers.__version__, "shape": SHAPE, "layers": config.num_layers,
              "tiny": args.tiny, "gen_len": args.gen_len, "results": results}
    (args.out / "accelerate_offload.json").write_text(json.dumps(report, indent=1))
    print(table(report, lens))
    return report


def table(report: dict, lens) -> str:
    lines = [f"\ntransformers {report['transformers']} + accelerate {report['accelerate']} CPU offload, synthetic "
             f"{report['shape']} x {report['layers']} layers, bf16, on {report['environment']['gpu'] or 'cpu'}",
             f"{'budget':<8} {'GPU layers':>10} " + " ".join(f"{'TTFT@' + str(n) + ' ms':>12}" for n in sorted(lens))
             + f" {'TPOT ms':>9} {'tok/s':>7} {'1st tok = dymoe':>16}"]
    for r in report["results"]:
        tpot = statistics.median(s for run in r["runs"].values() for s in run["step_s"])
        lines.append(f"{r['budget_percent']:>6g}%  {r['gpu_expert_layers']:>10} "
                     + " ".join(f"{r['runs'][n]['ttft_s'] * 1e3:>12.1f}" for n in sorted(lens))
                     + f" {tpot * 1e3:>9.1f} {1 / tpot:>7.2f} {str(r['first_token_agrees']):>16}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
