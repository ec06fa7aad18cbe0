"""Compile the one-token split-K decode kernels for sm_90 without a GPU and count the instructions
of their inner loop: what the kernels cost per packing word, checkable on any machine.

    pip install triton            # any machine; no GPU needed
    python benchmarks/sass_stats.py --format int4 --group 128 --model mixtral-8x7b
    python benchmarks/sass_stats.py --format int2 --group 64 --model qwen3-30b-a3b --set block_n=256

For each launch of the step (gate_up, down, and the input packing of the packed path; with
``--set one_launch=True`` the one launch of both) it prints the
grid, registers per thread, local memory (spills), shared memory, and the histogram of the SASS
instructions inside the kernel's largest loop with the instructions per packing word (int3: per 8
codes) of one loop iteration. The configs are ``split_config``'s (every format, int3 included);
``--set FIELD=VALUE`` changes a ``LaunchConfig`` field. ``--keep DIR`` writes the TTGIR, PTX and SASS
there. Uses Triton's own ptxas and nvdisasm, as the GPU machine's Triton would compile (pointer
arguments 16-byte aligned).
"""

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import torch

from dymoe.checkpoint.blob import blob_layout
from dymoe.quant.formats import parse_format
from dymoe.quant.kernels import kernel_plan

SHAPES = {"qwen3-30b-a3b": (2048, 768, 8), "mixtral-8x7b": (4096, 14336, 2), "olmoe": (2048, 1024, 8),
          "deepseek-v2-lite": (2048, 1408, 6), "gpt-oss-20b": (2880, 2880, 4)}
PAYLOAD = {torch.int32: "*i32", torch.uint8: "*u8", torch.int16: "*i16", torch.bfloat16: "*bf16"}


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loop_histogram(sass: str) -> collections.Counter:
    """Opcodes between the largest backward branch of ``sass`` and its target."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best = (0, -1)
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    ops = [m.group(1) for line in lines[best[0]:best[1] + 1]
           if (m := re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line))]
    return collections.Counter(ops)


def compile_sm90(fn, signature: dict, kwargs: dict, options: dict, stem: str) -> tuple:
    """Triton kernel ``fn`` compiled for sm_90 without a GPU: ``signature`` the types of its
    runtime arguments (the others are constexprs, from ``kwargs`` or their defaults; pointers
    16-byte aligned), ``options`` the launch's (num_warps, ...). Writes ``stem``.ttgir/.ptx/.cubin/
    .sass; returns (compiled, SASS text, registers per thread, local memory bytes: spills)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants = dict(signature), {}
    for arg in fn.arg_names:
        if arg not in signature:
            signature[arg] = "constexpr"
            constants[(fn.arg_names.index(arg),)] = kwargs.get(arg, fn.params[fn.arg_names.index(arg)].default)
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items() if t.startswith("*")}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options=options)
    for ext, key in (("ttgir", "ttgir"), ("ptx", "ptx")):
        with open(f"{stem}.{ext}", "w") as f:
            f.write(compiled.asm[key])
    with open(f"{stem}.cubin", "wb") as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([_tool("nvdisasm"), "-c", f"{stem}.cubin"], capture_output=True, text=True,
                          check=True).stdout
    with open(f"{stem}.sass", "w") as f:
        f.write(sass)
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f"{stem}.cubin"], capture_output=True,
                           text=True, check=True).stdout
    return compiled, sass, int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"LOCAL:(\d+)", usage).group(1))


def parse_sets(items: list[str], config_type) -> dict:
    """``FIELD=VALUE`` items (an integer, True, False or None) as changes of the dataclass
    ``config_type``'s fields; a ValueError names the first bad item."""
    fields = {f.name for f in dataclasses.fields(config_type)}
    constants = {"True": True, "False": False, "None": None}
    changes = {}
    for item in items:
        field, _, value = item.partition("=")
        if field not in fields:
            raise ValueError(f"--set {item}: {config_type.__name__} has no field {field!r} "
                             f"(fields: {', '.join(sorted(fields))})")
        if value not in constants and not value.isdigit():
            raise ValueError(f"--set {item}: the value must be an integer, True, False or None")
        changes[field] = constants.get(value, int(value) if value.isdigit() else None)
    return changes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="int4", help="bf16, int8, int4, int3 or int2 (default int4)")
    parser.add_argument("--group", type=int, default=128, help="group size (default 128)")
    parser.add_argument("--model", default="mixtral-8x7b", choices=sorted(SHAPES))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a LaunchConfig field of both launches (block_n=256, packed=False, ...)")
    parser.add_argument("--keep", metavar="DIR", help="write TTGIR, PTX and SASS of each launch here")
    args = parser.parse_args(argv)
    try:
        import triton
    except ImportError:
        parser.error("needs Triton: pip install triton (no GPU needed)")
    from dymoe.quant.kernels.triton_experts import LaunchConfig, _launches, split_config

    h, i, k = SHAPES[args.model]
    plan = kernel_plan(blob_layout(parse_format(args.format, args.group), h, i))

    try:
        overrides = parse_sets(args.set, LaunchConfig)
    except ValueError as exc:
        parser.error(str(exc))
    configs = [dataclasses.replace(split_config(plan, kernel, k, 132), **overrides) for kernel in ("gate_up", "down")]
    if configs[0].split_k is None:
        parser.error("--set split_k=None: this script reads the split-K kernels")
    gate_up, down = _launches(plan, k, 1, 132, False, *configs, pdl=True)  # sm_90: pdl as set
    payload = PAYLOAD[getattr(gate_up, "payload", None) or plan.payload_dtype]
    packed = getattr(gate_up, "packed", False)  # (older kernels: no packed activation vectors)
    hidden = "*i32" if packed else "*fp32"
    launches = [("gate_up", gate_up, dict(w_ptr=payload, s_ptr="*fp16", offsets_ptr="*i64", combine_ptr="*fp32",
                                          x_ptr="*i32" if packed else "*bf16", h_ptr=hidden, gu_ptr="*fp32",
                                          counters_ptr="*i32", E="i32")),
                ("down", down, dict(w_ptr=payload, s_ptr="*fp16", offsets_ptr="*i64", combine_ptr="*fp32",
                                    h_ptr=hidden, partial_ptr="*fp32", out_ptr="*bf16", counters_ptr="*i32", E="i32"))]
    if getattr(gate_up, "one_launch", False):  # both kernels' items in one launch (split_k._step_kernel)
        launches = [("one launch", gate_up, dict(w_ptr=payload, s_ptr="*fp16", offsets_ptr="*i64", combine_ptr="*fp32",
                                                 xin_ptr="*bf16", x_ptr="*i32" if packed else "*bf16", h_ptr=hidden,
                                                 gu_ptr="*fp32",
                                                 gu_counters_ptr="*i32", partial_ptr="*fp32", out_ptr="*bf16",
                                                 counters_ptr="*i32", step_ptr="*i32", E="i32"))]
    if getattr(gate_up, "prep", None) is not None:
        launches.append(("pack input", gate_up.prep, dict(x_ptr="*bf16", out_ptr="*i32")))
    keep = args.keep or tempfile.mkdtemp()
    os.makedirs(keep, exist_ok=True)
    print(f"{args.model} {args.format}/g{args.group}, one token, {k} experts, sm_90 (Triton {triton.__version__})")
    for name, launch, signature in launches:
        kwargs = dict(launch.kwargs)
        options = {o: kwargs.pop(o) for o in ("num_warps", "num_stages", "maxnreg", "launch_pdl") if o in kwargs}
        compiled, sass, regs, local = compile_sm90(launch.kernel, signature, kwargs, options,
                                                   os.path.join(keep, name.replace(" ", "_")))
        loop = loop_histogram(sass)
        print(f"\n{name}: grid {launch.grid}, {options.get('num_warps')} warps, {regs} registers, local {local} B, "
              f"shared {compiled.metadata.shared} B")
        if name in ("pack input", "one launch"):  # (the one launch: its loops are gate_up's and down's)
            continue
        # one loop iteration covers SUBS steps of SUB_K columns for each of the block's rows (x2: gate and up)
        words = (launch.kwargs["BLOCK_N"] * launch.kwargs["SUB_K"] * launch.kwargs["SUBS"]
                 // launch.kwargs["CPW"] * (2 if name == "gate_up" else 1))
        per_thread = words / (32 * options["num_warps"])
        total = sum(loop.values())
        print(f"  loop: {total} instructions per thread for {per_thread:g} words = {total / per_thread:.1f} per word")
        print("  " + ", ".join(f"{op} {n}" for op, n in loop.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
