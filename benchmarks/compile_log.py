"""Which Triton kernels compile after a model has loaded, and what each token costs meanwhile.

``python benchmarks/compile_log.py -m models/dymoe-demo-moe --policy dynaexq --device-memory 6MiB
-n 64 --cold --out OUT`` loads the model as ``dymoe generate`` does (same flags), then generates
while a Triton hook records every kernel specialisation the process builds (from its disk cache or
by compiling). ``--cold`` points ``TRITON_CACHE_DIR`` at an empty folder first, so every
specialisation is compiled, as on a user's first run. It prints the specialisations made before the
first token (start-up) and during generation (named by the token they slowed down), then the
per-token times. Details: ``OUT/compile_log.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from dymoe.cli.options import add_model_options, add_sampling_options

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    add_sampling_options(parser)
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--cold", action="store_true", help="compile into an empty Triton cache")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    return parser.parse_args(argv)


class CompileLog:
    """Triton's jit hooks, timed: one record per specialisation built in this process."""

    def __init__(self):
        self.records: list[dict] = []
        self.phase = "start-up"
        self._started: dict = {}

    def install(self) -> None:
        from triton import knobs

        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after

    def _before(self, *, key, repr, fn, **_) -> None:
        self._started[str(key)] = time.perf_counter()
        return None  # falsy: go on and build it

    def _after(self, *, key, repr, fn, **_) -> None:
        began = self._started.pop(str(key), time.perf_counter())
        self.records.append({"phase": self.phase, "kernel": fn.name, "seconds": time.perf_counter() - began,
                             "signature": repr})
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cold:  # before Triton reads it
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dymoe-triton-")
    from dymoe.cli.options import load_engine, open_model, sampling_params

    log = CompileLog()
    log.install()
    checkpoint, tokenizer = open_model(args)
    began = time.perf_counter()
    engine = load_engine(args, checkpoint, tokenizer)
    load_s = time.perf_counter() - began
    ids = tokenizer.encode(args.prompt)
    params = sampling_params(args)
    times, tokens = [], []
    last = time.perf_counter()
    for step, token in enumerate(engine.generate(ids, params)):
        now = time.perf_counter()
        times.append(now - last)
        tokens.append(token)
        last = now
        log.phase = f"token {step + 1}"  # what the next token's wait builds
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"load_s": load_s, "token_s": times, "compiles": log.records, "text": tokenizer.decode(tokens),
              "cold": args.cold, "policy": args.policy, "device_memory": args.device_memory}
    tmp = args.out / "compile_log.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.out / "compile_log.json")
    for phase in dict.fromkeys(r["phase"] for r in log.records):
        built = [r for r in log.records if r["phase"] == phase]
        print(f"{phase}: {len(built)} specialisations, {sum(r['seconds'] for r in built):.2f} s")
        if phase != "start-up":
            for r in built:
                print(f"  {r['seconds']:6.2f} s  {r['signature'][:220]}")
    print(f"load {load_s:.2f} s; first token (prefill) {times[0] * 1e3:.1f} ms")
    later = times[1:]
    if later:
        print("decode ms per token: " + " ".join(f"{t * 1e3:.1f}" for t in later[:12])
              + (" ..." if len(later) > 12 else ""))
        tail = later[len(later) // 2:]
        print(f"median of the second half {sorted(tail)[len(tail) // 2] * 1e3:.2f} ms; "
              f"mean of all {sum(later) / len(later) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
