"""Compile the fused routers for sm_90 without a GPU: registers, spills and code size of each
router shape's one-launch route (``route_decode``: its logits, its top-k, and with ``--pack`` the
int4 expert step's input) and of the top-k launch after a cuBLAS router (``route``). It also catches what only the GPU's compiler
refuses, which Triton's interpreter accepts (stop 25's first router packing did not compile where
K is split).

    pip install triton            # any machine; no GPU needed
    python benchmarks/router_sass.py
    python benchmarks/router_sass.py --pack --keep /tmp/router
"""

import argparse
import sys
import tempfile

from sass_stats import compile_sm90  # benchmarks/sass_stats.py

ROUTERS = {  # experts, hidden size, top-k
    "qwen3-30b-a3b": (128, 2048, 8), "olmoe": (64, 2048, 8), "deepseek-v2-lite": (64, 2048, 6),
    "mixtral-8x7b": (8, 4096, 2), "gpt-oss-20b": (32, 2880, 4)}
LINEAR_SIGNATURE = dict(x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16", partial_ptr="*fp32",
                        counters_ptr="*i32", ids_in_ptr="*i64", ids_ptr="*i64", weights_ptr="*bf16", scaling="fp32",
                        pack_ptr="*i32")
ROUTE_SIGNATURE = dict(logits_ptr="*bf16", ids_in_ptr="*i64", ids_ptr="*i64", weights_ptr="*bf16", E="i32",
                       scaling="fp32")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", action="store_true", help="the one-launch route also packs the int4 step's input")
    parser.add_argument("--sms", type=int, default=132, help="SMs the default cut aims at (default 132, an H100)")
    parser.add_argument("--keep", metavar="DIR", help="write TTGIR, PTX, cubin and SASS here")
    args = parser.parse_args(argv)
    try:
        import triton
    except ImportError:
        parser.error("needs Triton: pip install triton (no GPU needed)")
    from dymoe.models.fused import linear_config
    from dymoe.models.fused_kernels import linear_decode_kernel, route_kernel
    from dymoe.quant.kernels.triton_experts import PACK_BLOCK, chunk_values

    keep = args.keep or tempfile.mkdtemp()
    print(f"sm_90, Triton {triton.__version__}; registers per thread, local memory (spills), cubin KB")
    print(f"{'router':17s} {'launch':12s} {'cut':>14s} {'regs':>5s} {'local':>6s} {'KB':>6s}")
    for name, (experts, hidden, k) in ROUTERS.items():
        cut = linear_config(experts, hidden, 2 * args.sms)
        route = dict(TOP_K=k, E_BLOCK=triton.next_power_of_2(experts), KB=triton.next_power_of_2(k), GIVEN=False,
                     SIGMOID=False, NORMALIZE=True, ACCURATE=True)
        if args.pack:
            route.update(PACK_BITS=4, PACK_C=-(-hidden // chunk_values(4)), PACK_BLOCK=PACK_BLOCK)
        linear = dict(N=experts, K=hidden, BLOCK_N=cut.block_n, BLOCK_K=cut.block_k, SPLIT=cut.split,
                      STEPS=cut.steps, BIAS=False, ROUTE=True, **route)
        compiled, _, regs, local = compile_sm90(linear_decode_kernel, LINEAR_SIGNATURE, linear,
                                                {"num_warps": cut.warps}, f"{keep}/{name}-route_decode")
        shape = f"{cut.block_n}x{cut.block_k}/{cut.split}"
        print(f"{name:17s} {'route_decode':12s} {shape:>14s} {regs:5d} {local:6d} "
              f"{len(compiled.asm['cubin']) / 1024:6.0f}")
        after = dict(K=k, BLOCK=triton.next_power_of_2(experts), KB=triton.next_power_of_2(k), GIVEN=False,
                     SIGMOID=False, NORMALIZE=True, ACCURATE=True)
        warps = 1 if experts <= 128 else 4  # as fused.route launches it
        compiled, _, regs, local = compile_sm90(route_kernel, ROUTE_SIGNATURE, after, {"num_warps": warps},
                                                f"{keep}/{name}-route")
        print(f"{name:17s} {'route':12s} {f'{warps} warp(s)':>14s} {regs:5d} {local:6d} "
              f"{len(compiled.asm['cubin']) / 1024:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
