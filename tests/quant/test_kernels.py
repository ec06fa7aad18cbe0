"""Invariant 4 for the fused expert kernels: every entry point equals dequantize-then-matmul.

The torch backend runs everywhere; the Triton kernels run here through Triton's interpreter (in a
subprocess, since ``TRITON_INTERPRET`` is read when a kernel is defined) on small shapes that
still cover padded groups, tails of row blocks, duplicate slots and unused experts; the prefill
dequantize kernel must equal ``unpack_expert`` bit for bit. The GPU side is ``benchmarks/expert_kernels.py``
and ``benchmarks/prefill_kernels.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dymoe.checkpoint.blob import blob_layout, encode_expert, unpack_expert
from dymoe.errors import InputError
from dymoe.quant.formats import parse_format
from dymoe.quant.kernels import DequantWorkspace, decode_routing, dequantize_experts, expert_decode, kernel_plan
from dymoe.quant.kernels.reference import random_pool
from dymoe.quant.reference import dequantize, quantize
from tests.interpreted import needs_triton, run_interpreted

FORMATS = [("bf16", 128), ("int8", 128), ("int4", 64), ("int4", 128), ("int3", 64), ("int3", 128),
           ("int2", 64), ("int2", 128)]


def _experts(n: int, hidden: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(*shape, generator=g) * 0.05 for shape in ((inter, hidden), (inter, hidden),
                                                                         (hidden, inter))) for _ in range(n)]


def _pool_of(experts, layout):
    blobs = [encode_expert(*w, layout) for w in experts]
    return torch.cat(blobs), torch.arange(len(blobs), dtype=torch.int64) * layout.nbytes


@pytest.mark.parametrize("precision,group", FORMATS)
def test_torch_backend_is_dequantize_then_matmul(precision, group):
    layout = blob_layout(parse_format(precision, group), 160, 96)  # 160: a padded last group at 64 and 128
    experts = _experts(3, 160, 96)
    pool, offsets = _pool_of(experts, layout)
    x = torch.randn(2, 160, generator=torch.Generator().manual_seed(1))
    combine = torch.tensor([[0.5, 0.0, 0.25], [0.0, 0.0, 0.75]])
    expected = torch.zeros(2, 160)
    for e, (gate, up, down) in enumerate(experts):
        gate, up, down = (dequantize(quantize(w, layout.format), torch.float32) for w in (gate, up, down))
        expected += combine[:, e:e + 1] * F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    out = expert_decode(pool, offsets, layout, x, combine)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_unused_expert_is_never_read():
    layout = blob_layout(parse_format("int4", 64), 64, 32)
    pool, offsets = random_pool(layout, 2)
    x = torch.randn(1, 64)
    combine = torch.tensor([[1.0, 0.0]])
    expected = expert_decode(pool, offsets, layout, x, combine)
    pool[offsets[1]:].fill_(0xFF)  # fp16 0xFFFF is NaN: any read of expert 1 would show
    torch.testing.assert_close(expert_decode(pool, offsets, layout, x, combine), expected)


def test_decode_routing_deduplicates_without_changing_the_sum():
    g = torch.Generator().manual_seed(0)
    table = torch.arange(10, dtype=torch.int64) * 4096
    for tokens in (1, 2, 5, 8):
        ids = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(tokens)])
        weights = torch.rand(tokens, 4, generator=g)
        offsets, combine = decode_routing(table, ids, weights)
        dense = torch.zeros(tokens, 10)
        dense.scatter_(1, ids, weights)
        rebuilt = torch.zeros(tokens, 10).index_add_(1, offsets // 4096, combine)
        torch.testing.assert_close(rebuilt, dense)
        used = combine.abs().sum(0) > 0
        assert len(set((offsets[used] // 4096).tolist())) == int(used.sum())  # each slot read once


def test_unknown_backend_is_refused():
    layout = blob_layout(parse_format("int8"), 64, 32)
    pool, offsets = random_pool(layout, 1)
    with pytest.raises(ValueError, match="backend"):
        expert_decode(pool, offsets, layout, torch.randn(1, 64), torch.ones(1, 1), backend="cuda")


def test_the_triton_kernels_need_compute_capability_8(monkeypatch):
    """On a GPU older than Ampere (no bf16 tensor-core tiles for tl.dot) the kernels never run:
    ``auto`` takes the torch path (so the decode is not recorded: the torch path reads offsets on
    the host), no workspace is allocated, the mapped decode says why it does not apply, and asking
    for the Triton backend outright is a clear error naming both capabilities."""
    from types import SimpleNamespace

    from dymoe.quant import kernels
    from dymoe.runtime import mapped

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda"))  # a pool as _resolve sees it
    layout = blob_layout(parse_format("int4", 64), 64, 32)
    monkeypatch.setattr(kernels, "_capability", lambda device: (7, 5))
    assert kernels._resolve("auto", gpu) == "torch"
    with pytest.raises(ValueError, match=r"compute capability 8.0\+ .* this GPU has 7.5: use backend 'auto' or 'torch'"):
        kernels._resolve("triton", gpu)
    assert not kernels.expert_decode_capturable("cuda")
    assert kernels.decode_workspace(layout, 8, 1, "cuda") is None
    runtime = SimpleNamespace(low=None, config=SimpleNamespace(prefetch_depth=0, keep_across_layers=True),
                              store=SimpleNamespace(holds_every=lambda precision: True), precision="int4",
                              device=torch.device("cuda"))
    monkeypatch.setattr(mapped, "MemoryStore", SimpleNamespace)
    monkeypatch.setattr(mapped, "triton_available", lambda: True)
    assert mapped._why_not(runtime) == "the Triton expert kernels need compute capability 8.0+"
    monkeypatch.setattr(kernels, "_capability", lambda device: (8, 0))
    assert kernels._resolve("auto", gpu) == "triton" and kernels._resolve("triton", gpu) == "triton"
    assert kernels.expert_decode_capturable("cuda")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels._resolve("auto", gpu) == "torch" and not kernels.expert_decode_capturable("cuda")


def test_plan_offsets_match_the_blob_layout():
    layout = blob_layout(parse_format("int3", 64), 2048, 768)
    plan = kernel_plan(layout)
    assert plan.gate.weight == layout.part("gate.weight").offset  # int3 is read as bytes
    assert plan.down.scales * 2 == layout.part("down.scales").offset
    assert plan.down.padded_cols == 768 and plan.gate.row_elems == 2048 * 3 // 8


_INTERPRETED = r"""
import json, torch
from dymoe.checkpoint.blob import blob_layout
from dymoe.quant.formats import parse_format
from dymoe.quant.kernels import decode_routing, expert_decode, kernel_plan
from dymoe.quant.kernels.reference import random_pool
from dymoe.quant.kernels.triton_experts import DecodeWorkspace, LaunchConfig, launch_decode, runs_packed, tiled_config

from dymoe.models.expert_math import SWIGLU, ExpertMath

def run(layout, pool, offsets, x, combine, configs, math=SWIGLU):
    plan = kernel_plan(layout)
    ws = DecodeWorkspace.allocate(plan, combine.shape[1], x.shape[0], "cpu")
    for scratch in ws.scratch():
        scratch.fill_(float("nan"))  # a scratch value read before it is written shows in the result
    out = launch_decode(pool, offsets, plan, x, combine, ws, *configs, math=math)
    counters_reset = not (ws.counters.any() or ws.gate_up_counters.any())
    return out, counters_reset

results = {}
# GPT-OSS's experts: biases (10x the random pool's, so that leaving one out shows) and the clamped
# activation at a limit the random weights reach (0.1), against the same torch reference
GPT_OSS = ExpertMath("gpt_oss", bias=True, limit=0.1, alpha=1.702)
for precision, group, math in [(p, g, SWIGLU) for p, g in FORMATS] + [(p, g, GPT_OSS) for p, g in BIASED]:
  # 160 and 96 features: padded last groups at 64 and 128; both kernels cut K in 2 slices at block_k 64
  # (32 for the formats without groups) and leave a tail row block at block_n 64
  layout = blob_layout(parse_format(precision, group), 160, 96, bias=math.bias)
  plan = kernel_plan(layout)
  pool, table = random_pool(layout, 6, seed=3, spare_bytes=256)  # the 6th blob: for the unused column
  for e in range(6) if math.bias else ():
    for name in ("gate_up.bias", "down.bias"):
      part = layout.part(name)
      start = e * (layout.nbytes + 256) + part.offset
      pool[start:start + part.nbytes].view(torch.bfloat16).mul_(10)
  small_k = 32 if plan.group_size == 0 else max(64, plan.group_size)
  cases = {  # name: (tokens, gate_up and down configs; None: choose_config's)
      "T3": (3, (None, None)),  # several tokens: tensor cores
      "T1-tiled": (1, (tiled_config(plan, 96, 2, 132, gemv=plan.bits < 16),
                       tiled_config(plan, 160, 2, 132, gemv=plan.bits < 16))),  # the first one-token kernels
      # int4, int3 and int2 run on packed activation vectors (64 rows: whole chunks of h), their float16
      # FMAs emulated; steps of two groups, one call per group
      "T1-split": (1, (LaunchConfig(64, 2 * small_k, 1, 1, split_k=2, packed=True),) * 2),
  }
  if plan.bits in (4, 3, 2):  # their float32 split-K path too (int2/g64 runs it by default)
      cases["T1-split-float32"] = (1, (LaunchConfig(64, small_k, 1, 1, split_k=2),) * 2)
      # and the packed path with a model's massive activations (a few of up to 800 among values of
      # 0.01): each chunk's prescale keeps its float16 products in range; block steps of two groups
      # (at g64 a gate_up slice ends inside a step, so its second group is masked)
      cases["T1-split-outliers"] = (1, (LaunchConfig(64, 2 * small_k, 1, 1, split_k=2, packed=True,
                                                     block_steps=True),) * 2)
  for name, (tokens, configs) in cases.items():
    g = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(tokens)])  # slots in any order
    offsets, combine = decode_routing(table, ids, torch.rand(tokens, 3, generator=g))
    combine[:, 1] = 0.0  # an expert no token uses: never read, still counted by the reductions
    offsets[1] = table[5]  # ... in a slot no other column uses (a padded column's filler)
    x = torch.randn(tokens, 160, generator=g)
    if name.endswith("outliers"):
        x = x * 0.01
        x[0, [3, 40, 77, 150]] = torch.tensor([800.0, -300.0, 120.0, 60.0])
    x = x.bfloat16()
    ref = expert_decode(pool, offsets, layout, x.float(), combine, backend="torch", math=math)
    # the unused expert's blob as NaN bytes (a padded column's filler slot may hold anything): a
    # kernel that reads any of it (weights, int8 row scales, biases) and multiplies by zero shows NaN
    poisoned = pool.clone()
    start = int(table[5])
    poisoned[start:start + layout.nbytes] = 0xFF
    out, counters_reset = run(layout, poisoned, offsets, x, combine, configs, math)
    key = f"{precision}/{group}/{name}" + ("/gpt_oss" if math.bias else "")
    packed = name.startswith("T1-split") and runs_packed(plan, *configs)
    results[key] = [((out.float() - ref).norm() / ref.norm()).item(), bool(out.isfinite().all()), counters_reset,
                    packed]
    if tokens == 1 and name in ("T1-tiled", "T1-split"):
        # routed_decode's form: the slot table and ids handed over, the router's bf16 weights read as
        # float32 in the kernels; the same output bit for bit as the offsets and float32 weights
        weights = combine.bfloat16()
        slots = ids[0].clone()
        slots[1] = 5
        ws = DecodeWorkspace.allocate(plan, 3, 1, "cpu")
        indirect = launch_decode(poisoned, table, plan, x, weights, ws, *configs, math=math, slot_ids=slots)
        direct, _ = run(layout, poisoned, offsets, x, weights.float(), configs, math)
        results[key + "/indirect"] = [torch.equal(indirect, direct), ((indirect.float() - direct.float()).abs().max()
                                                                      / direct.float().abs().max()).item()]
print(json.dumps(results))
"""

CASES = ("T3", "T1-tiled", "T1-split")
VARIANTS = ("float32", "outliers")  # more one-token split-K cases of the formats with a packed path
BIASED = [("bf16", 128), ("int8", 128), ("int4", 64), ("int3", 128), ("int2", 64)]  # GPT-OSS experts


@needs_triton
def test_triton_kernels_under_the_interpreter():
    """Every format through the tensor-core path (3 tokens), the tiled one-token GEMV and the
    split-K one-token GEMV (2 K slices in both kernels, reduced by the last program of each block;
    int4, int3 and int2 also on packed activation vectors, their float16 FMAs emulated with float16
    rounding, with normal and with outlier activations),
    plain SwiGLU and GPT-OSS's biased, clamped experts: within 1e-2 of the float32 reference, no
    NaN from the poisoned scratch or from the unused expert's NaN-filled blob, every counter reset.
    One token given as routed_decode gives it (the slot table indexed by the ids in the kernels, bf16
    router weights): bit for bit the offsets' and float32 weights' output, tiled and split-K."""
    results = run_interpreted(f"FORMATS = {FORMATS!r}\nBIASED = {BIASED!r}\n" + _INTERPRETED, fp_fusion=True)
    packable = {"int4", "int3", "int2"}  # formats with a packed path (they also run the float32 one)
    indirect = {name: results.pop(name) for name in list(results) if name.endswith("/indirect")}
    assert len(indirect) == 2 * (len(FORMATS) + len(BIASED))
    for name, (equal, difference) in indirect.items():
        assert equal, (name, difference)
    assert set(results) == ({f"{p}/{g}/{c}" for p, g in FORMATS for c in CASES}
                            | {f"{p}/{g}/{c}/gpt_oss" for p, g in BIASED for c in CASES}
                            | {f"{p}/{g}/T1-split-{v}" for p, g in FORMATS if p in packable for v in VARIANTS}
                            | {f"{p}/{g}/T1-split-{v}/gpt_oss" for p, g in BIASED if p in packable for v in VARIANTS})
    for name, (rel_err, finite, counters_reset, packed) in results.items():
        assert finite and rel_err < 1e-2, (name, rel_err)
        assert counters_reset, name
        precision, _, case = name.split("/")[:3]
        assert packed == (precision in packable and case in ("T1-split", "T1-split-outliers")), name


_INTERPRETED_ONE_LAUNCH = r"""
import dataclasses, json, torch
from dymoe.checkpoint.blob import blob_layout
from dymoe.models.expert_math import SWIGLU, ExpertMath
from dymoe.quant.formats import parse_format
from dymoe.quant.kernels import decode_routing, expert_decode, kernel_plan
from dymoe.quant.kernels.reference import random_pool
from dymoe.quant.kernels.triton_experts import (PACK_BLOCK, DecodeWorkspace, LaunchConfig, _launches, chunk_values,
                                                launch_decode, packed_words)
from dymoe.quant.kernels.split_k import _pack_input_kernel

GPT_OSS = ExpertMath("gpt_oss", bias=True, limit=0.1, alpha=1.702)
results = {}
for precision, group, math in [(p, g, SWIGLU) for p, g in FORMATS] + [("int4", 64, GPT_OSS)]:
    layout = blob_layout(parse_format(precision, group), 160, 96, bias=math.bias)
    plan = kernel_plan(layout)
    pool, table = random_pool(layout, 6, seed=3, spare_bytes=256)
    small_k = 32 if plan.group_size == 0 else max(64, plan.group_size)
    two = LaunchConfig(64, 2 * small_k, 1, 1, split_k=2, packed=plan.bits in (4, 3, 2), block_steps=True)
    one = dataclasses.replace(two, one_launch=True)
    # the float32 path at one group per step (preload needs one step per loop iteration)
    flat = LaunchConfig(64, small_k, 1, 1, split_k=2, packed=False)
    configs = {"two": two, "one": one, "two_pre": dataclasses.replace(two, preload=True),
               "one_pre": dataclasses.replace(one, preload=True), "flat": flat,
               "flat_pre": dataclasses.replace(flat, preload=True)}
    preloads = {name: [launch.kwargs["PRELOAD"] for launch in _launches(plan, 3, 1, 132, True, cfg, cfg, math)]
                for name, cfg in configs.items()}
    outs = {}
    # the input packed before the step (as a router packs it: InputPacking), in both launch forms
    runs = [(name, cfg, False) for name, cfg in configs.items()]
    runs += [(name + "_prepacked", configs[name], True) for name in ("two", "one") if plan.bits in (4, 3, 2)]
    for name, cfg, prepacked in runs:
        ws = DecodeWorkspace.allocate(plan, 3, 1, "cpu")
        for scratch in ws.scratch():
            scratch.fill_(float("nan"))
        g = torch.Generator().manual_seed(4)
        steps = []
        for step in range(2):  # two steps back to back on one workspace: the counters must be reset
            ids = torch.randperm(5, generator=g)[:3][None]
            offsets, combine = decode_routing(table, ids, torch.rand(1, 3, generator=g))
            combine[:, 1] = 0.0  # an expert no token uses: its items still count
            x = torch.randn(1, 160, generator=g).bfloat16()
            ref = expert_decode(pool, offsets, layout, x.float(), combine, backend="torch", math=math)
            packed = None
            if prepacked:
                packed = torch.full((packed_words(160, plan.bits),), -1, dtype=torch.int32)
                _pack_input_kernel[(-(-160 // PACK_BLOCK),)](x, packed, H=160, C=-(-160 // chunk_values(plan.bits)),
                                                             BITS=plan.bits, BLOCK=PACK_BLOCK)
            out = launch_decode(pool, offsets, plan, x, combine, ws, cfg, cfg, math=math, x_packed=packed)
            steps.append((out, ref))
        outs[name] = steps
        reset = not (ws.counters.any() or ws.gate_up_counters.any() or ws.step_counters.any())
        outs[name + "_reset"] = reset
    key = f"{precision}/{group}" + ("/gpt_oss" if math.bias else "")
    same = lambda a, b: all(torch.equal(x[0], y[0]) for x, y in zip(outs[a], outs[b]))
    prepacked = [name for name, _, pre in runs if pre]
    results[key] = {
        "rel_err": max(((o.float() - r).norm() / r.norm()).item() for n in configs for o, r in outs[n]),
        "same_as_two": same("one", "two") and same("two_pre", "two") and same("one_pre", "two"),
        "prepacked": len(prepacked), "prepacked_same": all(same(name, "two") for name in prepacked),
        "flat_same": same("flat_pre", "flat"),
        "finite": all(bool(o.isfinite().all()) for n in configs for o, _ in outs[n]),
        "reset": all(outs[n + "_reset"] for n in configs), "preloads": preloads}
print(json.dumps(results))
"""


@needs_triton
def test_one_launch_step_equals_the_two_launches_under_the_interpreter():
    """``LaunchConfig.one_launch`` (the input packing, gate_up and down as work items of one launch,
    each waiting for what it reads) and ``LaunchConfig.preload`` (each program's first step of
    weights loaded before it waits), in both launch forms and on the float32 path: every format and
    GPT-OSS's biased experts give the two-launch step's output bit for bit, within 1e-2 of the
    float32 reference, for two steps back to back on one NaN-poisoned workspace (K slices of one
    and of two steps, an expert no token uses), with every counter (tickets, packed, ready, done)
    back at zero. With the input packed before the step (``x_packed``, as the router packs it), both
    forms give the same output bit for bit."""
    results = run_interpreted(f"FORMATS = {FORMATS!r}\n" + _INTERPRETED_ONE_LAUNCH, fp_fusion=True)
    assert set(results) == {f"{p}/{g}" for p, g in FORMATS} | {"int4/64/gpt_oss"}
    for name, r in results.items():
        assert r["finite"] and r["rel_err"] < 1e-2, (name, r)
        assert r["same_as_two"] and r["flat_same"] and r["reset"], (name, r)
        assert r["prepacked_same"] and r["prepacked"] == (2 if name.split("/")[0] in ("int4", "int3", "int2") else 0), \
            (name, r)
        preloads = r["preloads"]
        assert preloads["two"] == preloads["flat"] == [False, False] and preloads["one"][0] is False, (name, r)
        assert preloads["two_pre"] == preloads["flat_pre"] == [True, True] and preloads["one_pre"][0] is True, \
            (name, r)


@needs_triton
def test_packed_default_per_format_and_environment(monkeypatch):
    """One-token int2, int3 and int4 run on packed activation vectors where a group holds whole
    chunks, never bf16 or int8; DYMOE_PACKED_DECODE turns the packed path on (1) or off (0) for
    all three formats; any other value is one clear error (a user error:
    the CLI prints it on one line)."""
    from dymoe.quant.kernels import triton_experts as te

    def packs(precision, group):
        fmt = parse_format(precision, 128)
        if group != 128 and fmt.is_grouped:  # (g32: not offered to users; a group under one chunk)
            fmt = dataclasses.replace(fmt, group_size=group)
        return te.packs_by_default(kernel_plan(blob_layout(fmt, 256, 128)))

    cases = [("bf16", 128), ("int8", 128), ("int4", 64), ("int4", 128), ("int3", 64), ("int3", 128),
             ("int2", 64), ("int2", 128), ("int3", 32), ("int2", 32)]  # g32: under a chunk, no packed path
    monkeypatch.setattr(te, "PACKED_OVERRIDE", None)
    assert [packs(p, g) for p, g in cases] == [False, False, True, True, True, True, True, True, False, False]
    monkeypatch.setattr(te, "PACKED_OVERRIDE", True)
    assert [packs(p, g) for p, g in cases] == [False, False, True, True, True, True, True, True, False, False]
    monkeypatch.setattr(te, "PACKED_OVERRIDE", False)
    assert not any(packs(p, g) for p, g in cases)
    for value, expected in (("", None), ("1", True), ("0", False)):
        monkeypatch.setenv("DYMOE_PACKED_DECODE", value)
        assert te._packed_override() is expected
    monkeypatch.setenv("DYMOE_PACKED_DECODE", "yes")
    with pytest.raises(InputError, match="DYMOE_PACKED_DECODE='yes': use 1"):
        te._packed_override()


@needs_triton
def test_pdl_launches_only_after_the_first_and_only_where_supported(monkeypatch):
    """Programmatic dependent launch: gate_up (after pack input) and down start early, reading the
    expert ids before they wait, and every launch gets its griddepcontrol; the step's first launch
    (pack input, else gate_up) may follow anything, so it starts early only with EARLY_STEP (the
    default), and then waits before reading anything (``EARLY``); a device without pdl (or the
    interpreter) gets none of that whatever the config; DYMOE_PDL sets split_config's field
    (unset: on for steps of at most PDL_MAX_WEIGHTS weights per projection), DYMOE_ONE_LAUNCH its
    one_launch (unset: on for the long int8, int4 and int2/g64 steps), and a bad value of either
    is one clear error."""
    from dymoe.quant.kernels import triton_experts as te

    def first_and_rest(gate_up, down, packed):
        first = gate_up.prep if packed else gate_up
        early = first.kwargs.get("launch_pdl", False)
        assert first.kwargs.get("EARLY", False) is early  # launched early <=> waits before anything
        assert "EARLY" not in down.kwargs and down.kwargs["launch_pdl"] is True
        if packed:
            assert "EARLY" not in gate_up.kwargs and gate_up.kwargs["launch_pdl"] is True
        return early

    for early_step in (True, False):
        monkeypatch.setattr(te, "EARLY_STEP", early_step)
        te._launches.cache_clear()
        for precision, packed in (("int4", True), ("int4", False), ("int8", False)):
            plan = kernel_plan(blob_layout(parse_format(precision, 128), 2048, 768))
            cfgs = [dataclasses.replace(te.split_config(plan, k, 8, 132), packed=packed, pdl=True)
                    for k in ("gate_up", "down")]
            gate_up, down = te._launches(plan, 8, 1, 132, False, *cfgs, pdl=True)
            assert gate_up.packed is packed
            assert first_and_rest(gate_up, down, packed) is early_step
            assert gate_up.kwargs["PDL"] and down.kwargs["PDL"] and (not packed or gate_up.prep.kwargs["PDL"])
            for supported, interpreting in ((False, False), (True, True)):
                gate_up, down = te._launches(plan, 8, 1, 132, interpreting, *cfgs, pdl=supported)
                launches = [gate_up, down] + ([gate_up.prep] if packed else [])
                assert not any("launch_pdl" in x.kwargs or "EARLY" in x.kwargs or x.kwargs["PDL"] for x in launches)
            if packed:  # the input packed before the step (by the router): gate_up first
                gate_up, down = te._launches(plan, 8, 1, 132, False, *cfgs, pdl=True, prepacked=True)
                assert gate_up.packed and gate_up.prep is None
                assert first_and_rest(gate_up, down, False) is early_step
            else:
                with pytest.raises(ValueError, match="a prepacked input for a step that does not run packed"):
                    te._launches(plan, 8, 1, 132, False, *cfgs, pdl=True, prepacked=True)
    te._launches.cache_clear()  # (no launch made with the patched EARLY_STEP outlives the test)
    monkeypatch.setenv("DYMOE_EARLY_STEP", "no")
    with pytest.raises(InputError, match="DYMOE_EARLY_STEP='no': use 1"):
        te._early_step()
    assert not te.pdl_supported(torch.device("cpu"))
    qwen3, mixtral = (kernel_plan(blob_layout(parse_format("int4", 128), h, i)) for h, i in ((2048, 768), (4096, 14336)))
    for value, override, expected in (("", None, (True, False)), ("0", False, (False, False)), ("1", True, (True, True))):
        monkeypatch.setenv("DYMOE_PDL", value)
        assert te._pdl_override() is override
        monkeypatch.setattr(te, "PDL_OVERRIDE", override)
        cfgs = [te.split_config(plan, "down", 8, 132) for plan in (qwen3, mixtral)]
        assert tuple(c.pdl for c in cfgs) == expected  # unset: short steps only (pdl_by_default)
        assert all(c.block_steps for c in cfgs)  # block steps: the packed default
    monkeypatch.setenv("DYMOE_PDL", "yes")
    with pytest.raises(InputError, match="DYMOE_PDL='yes': use 1"):
        te._pdl_override()
    # DYMOE_ONE_LAUNCH the same way; unset: the long int8, int4 and int2/g64 steps only (one_launch_by_default)
    plans = [qwen3, mixtral] + [kernel_plan(blob_layout(parse_format(p, g), 4096, 14336))
                                for p, g in (("int8", 64), ("int3", 64), ("int2", 64), ("int2", 128))]
    for value, override, expected in (("", None, (False, True, True, False, True, False)), ("0", False, (False,) * 6),
                                      ("1", True, (True,) * 6)):
        monkeypatch.setenv("DYMOE_ONE_LAUNCH", value)
        assert te._one_launch_override() is override
        monkeypatch.setattr(te, "ONE_LAUNCH_OVERRIDE", override)
        assert tuple(te.split_config(plan, "gate_up", 8, 132).one_launch for plan in plans) == expected
    monkeypatch.setenv("DYMOE_ONE_LAUNCH", "on")
    with pytest.raises(InputError, match="DYMOE_ONE_LAUNCH='on': use 1"):
        te._one_launch_override()
    # preload (preload_by_default): int4 everywhere, int8 and int3 on short steps only, never int2
    shapes = {"short": (2048, 768), "long": (4096, 14336)}
    preloads = {(p, size): te.split_config(kernel_plan(blob_layout(parse_format(p, 128), *shapes[size])), k, 8,
                                           132).preload
                for p in ("int8", "int4", "int3", "int2") for size in shapes for k in ("gate_up", "down")}
    assert {key for key, on in preloads.items() if on} == {("int8", "short"), ("int4", "short"), ("int4", "long"),
                                                         ("int3", "short")}


@needs_triton
def test_choose_config_splits_k_for_one_token_only():
    """Packed formats at one token get split-K with enough blocks for every SM; several tokens,
    bf16 and int3 without its packed path (float32 split-K measured no faster there) keep the
    tiled kernels; a split never exceeds K's steps or MAX_SPLIT; int4 caps its registers; the row
    blocks are as measured fastest."""
    from dymoe.quant.kernels.triton_experts import MAX_SPLIT, choose_config, packs_by_default

    for precision, group in FORMATS:
        for hidden, inter, k in ((2048, 768, 8), (4096, 14336, 2)):
            plan = kernel_plan(blob_layout(parse_format(precision, group), hidden, inter))
            for kernel, rows, cols in (("gate_up", inter, hidden), ("down", hidden, inter)):
                one = choose_config(plan, kernel, k, 1, 132)
                assert choose_config(plan, kernel, k, 4, 132).split_k is None
                if plan.bits == 16 or plan.bits == 3 and not packs_by_default(plan):
                    assert one.split_k is None
                    continue
                assert one.packed == packs_by_default(plan)
                assert one.max_registers == (128 if plan.bits == 4 else None)
                # 128-row blocks, but 64 for int8 and for int2/g128's long steps (measured slower there)
                long_int2 = plan.bits == 2 and plan.group_size == 128 and hidden == 4096
                assert one.block_n == (64 if plan.bits == 8 or long_int2 else 128), (precision, group, hidden)
                steps = -(-cols // one.block_k)
                assert 1 <= one.split_k <= min(MAX_SPLIT, steps)
                assert one.block_k % max(plan.group_size, 1) == 0
                blocks = k * -(-rows // one.block_n) * one.split_k
                assert blocks >= 2 * 132 or one.split_k == min(MAX_SPLIT, steps)


# ---- prefill: several experts dequantized into a workspace ---------------------------------------


def _unpacked(pool, offsets, layout, dtype):
    parts = [unpack_expert(pool[o:o + layout.nbytes], layout, dtype) for o in offsets.tolist()]
    return torch.stack([torch.cat([g, u]) for g, u, _ in parts]), torch.stack([d for _, _, d in parts])


@pytest.mark.parametrize("precision,group", FORMATS)
def test_torch_dequantize_writes_unpack_expert_into_the_workspace(precision, group):
    layout = blob_layout(parse_format(precision, group), 160, 48)
    pool, table = random_pool(layout, 5, seed=2, spare_bytes=256)
    offsets = table[torch.tensor([3, 0, 4])]  # odd slot order
    workspace = DequantWorkspace.allocate(layout, 4, "cpu", torch.bfloat16)
    workspace.gate_up.fill_(float("nan"))
    workspace.down.fill_(float("nan"))
    dequantize_experts(pool, offsets, layout, *workspace.views(1, 3))
    gate_up, down = _unpacked(pool, offsets, layout, torch.bfloat16)
    assert torch.equal(workspace.gate_up[1:], gate_up) and torch.equal(workspace.down[1:], down)
    assert workspace.gate_up[0].isnan().all() and workspace.down[0].isnan().all()  # outside the views: untouched


def test_dequantize_refuses_outputs_of_the_wrong_size():
    layout = blob_layout(parse_format("int4", 64), 64, 32)
    pool, offsets = random_pool(layout, 2)
    workspace = DequantWorkspace.allocate(layout, 3, "cpu", torch.float32)
    with pytest.raises(ValueError, match="2 experts"):
        dequantize_experts(pool, offsets, layout, *workspace.views(0, 3))
    with pytest.raises(ValueError, match="holds 3 experts"):
        workspace.views(2, 2)


_INTERPRETED_DEQUANT = r"""
import json, torch
from dymoe.checkpoint.blob import blob_layout
from dymoe.quant.formats import parse_format
from dymoe.quant.kernels import DequantWorkspace, dequantize_experts
from dymoe.quant.kernels.dequant import DequantConfig
from dymoe.quant.kernels.reference import random_pool
results = {}
# 32 x 128 tiles on 160 x 48 experts: two column tiles (the second partly past H), row tiles with
# tails, a padded last group at 64 and 128; float32 once (the CPU runtime's dtype)
cases = [(p, g, torch.bfloat16) for p, g in FORMATS] + [("int4", 64, torch.float32)]
for precision, group, dtype in cases:
    layout = blob_layout(parse_format(precision, group), 160, 48)
    pool, table = random_pool(layout, 5, seed=3, spare_bytes=256)
    offsets = table[torch.tensor([3, 0, 4])]  # odd slot order
    ref = DequantWorkspace.allocate(layout, 3, "cpu", dtype)
    dequantize_experts(pool, offsets, layout, *ref.views(0, 3), backend="torch")
    out = DequantWorkspace.allocate(layout, 4, "cpu", dtype)
    out.gate_up.fill_(float("nan"))
    out.down.fill_(float("nan"))
    dequantize_experts(pool, offsets, layout, *out.views(1, 3), backend="triton", config=DequantConfig(32, 128))
    results[f"{precision}/{group}/{dtype}"] = [torch.equal(out.gate_up[1:], ref.gate_up),
                                               torch.equal(out.down[1:], ref.down),
                                               bool(out.gate_up[0].isnan().all() and out.down[0].isnan().all())]
print(json.dumps(results))
"""


@needs_triton
def test_triton_dequantize_under_the_interpreter_is_bit_exact():
    results = run_interpreted(f"FORMATS = {FORMATS!r}\n" + _INTERPRETED_DEQUANT, timeout=300)
    assert len(results) == len(FORMATS) + 1
    for name, (gate_up_equal, down_equal, untouched) in results.items():
        assert gate_up_equal and down_equal and untouched, name
