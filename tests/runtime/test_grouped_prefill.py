"""The grouped-GEMM prefill (dymoe/runtime/expert_compute.py, resident.py): on the GPU it replaces
the per-expert loop; torch's CPU ``_grouped_mm`` lets the same code run here against the loop."""

from __future__ import annotations

import pytest
import torch

from dymoe.runtime import expert_compute
from dymoe.runtime.expert_compute import group_by_expert, run_grouped
from dymoe.runtime.resident import grouped_prefill

E, H, I, K, N = 6, 64, 32, 2, 40


@pytest.fixture
def experts():
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / 8).to(torch.bfloat16)
    down = (torch.randn(E, H, I, generator=g) / 8).to(torch.bfloat16)
    x = torch.randn(N, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    ids[:, 0] = torch.where(ids[:, 0] == 4, 0, ids[:, 0])  # expert 4 only ever second choice
    ids[ids == 5] = 1 if (ids == 1).sum() == 0 else ids[ids == 5]  # leave some expert rare
    weights = torch.softmax(torch.randn(N, K, generator=g), -1).to(torch.bfloat16)
    return gate_up, down, x, ids, weights


def test_grouped_batches_equal_the_per_expert_loop(experts, monkeypatch):
    gate_up, down, x, ids, weights = experts
    loop = run_grouped(x, ids, weights, lambda e: (gate_up[e], down[e]))
    monkeypatch.setattr(expert_compute, "grouped_mm_usable", lambda t: True)
    one_expert = gate_up[0].nbytes + down[0].nbytes
    copied = []
    for capacity in (1, 2, 5, 100):  # flushes every expert, in pairs, ..., once
        monkeypatch.setattr(expert_compute, "GROUPED_BYTES", capacity * one_expert)
        grouping = group_by_expert(ids)
        order = list(reversed(range(len(grouping[1]))))  # a runtime's schedule need not be sorted

        def weights_of(e):
            copied.append(e)
            return gate_up[e].clone(), down[e].clone()  # like a slot that is overwritten afterwards

        grouped = run_grouped(x, ids, weights, weights_of, grouping, schedule=order)
        torch.testing.assert_close(grouped, loop, rtol=0, atol=0)
    assert len(copied) == 4 * len(group_by_expert(ids)[1])  # each expert's weights asked for once per call


def test_resident_grouped_prefill_equals_the_loop(experts):
    gate_up, down, x, ids, weights = experts
    loop = run_grouped(x, ids, weights, lambda e: (gate_up[e], down[e]))
    torch.testing.assert_close(grouped_prefill(x, ids, weights, gate_up, down), loop, rtol=0, atol=0)


def test_offloaded_prefill_in_waves_equals_the_loop(tmp_path, monkeypatch):
    """An lru runtime at one token's top-k of slots runs a prompt's experts in many waves whose slots
    are reused: the bf16 experts gathered per wave from the slot stacks (in batches of 2 with
    3k slots) equal the per-expert loop; the runtime never hands bf16 weights over one by one."""
    from dymoe.models.transformer import load_dense
    from dymoe.runtime.offload import OffloadConfig, OffloadedExperts
    from dymoe.runtime.prefill import PrefillDequantizer
    from dymoe.runtime.presets import PRESETS
    from tests.tiny_models import tiny_store

    checkpoint, store = tiny_store(tmp_path, "qwen3_moe", 4, ("bf16", "int4"))
    model = load_dense(checkpoint, 64, "cpu", torch.bfloat16)
    prompt = torch.tensor([[1, 17, 42, 5, 63, 8, 29, 11, 2, 90, 33, 7]])
    k = checkpoint.config.num_experts_per_tok
    default_bytes = expert_compute.GROUPED_BYTES
    results = {}
    for grouped in (False, True):
        monkeypatch.setattr(expert_compute, "grouped_mm_usable", lambda t, on=grouped: on)
        for preset in ("lru", "static-int4"):
            one = store.layout(PRESETS[preset]["precision"]).nbytes
            for slots, capacity in ((k, None), (3 * k, 2)):
                experts = OffloadedExperts(store, OffloadConfig(budget_bytes=slots * one, **PRESETS[preset]), k,
                                           "cpu", torch.bfloat16)
                # with 3k slots, bf16 gathers of 2 experts: several batches per wave
                pair = 2 * sum(t[0].nbytes for t in experts._stacks) if experts._stacks else 1
                monkeypatch.setattr(expert_compute, "GROUPED_BYTES", pair if capacity else default_bytes)
                monkeypatch.setattr(experts, "_weights", lambda *a: pytest.fail("bf16 weights handed over one by one"))
                for precision, old in experts._prefill.items() if capacity else ():
                    # a workspace of 2 experts: a wave's int4 experts run as ExpertRuns over rows that
                    # the next chunk overwrites, so each run must be computed before that launch
                    experts._prefill[precision] = PrefillDequantizer(old.pool, old.slot_offset, old.layout, capacity,
                                                                     torch.bfloat16, old.wait)
                model.attach_experts(experts)
                results[grouped, preset, slots] = model(prompt, 0, model.new_cache(1))
                launches = sum(d.launches for d in experts._prefill.values())
                assert launches > 0 if preset == "static-int4" else launches == 0
    for key in [key for key in results if key[0]]:
        torch.testing.assert_close(results[key], results[False, *key[1:]], rtol=0, atol=0)
    torch.testing.assert_close(results[True, "lru", 3 * k], results[False, "lru", k], rtol=0, atol=0)
    unchunked = results[False, "static-int4", k]
    torch.testing.assert_close(results[True, "static-int4", 3 * k], unchunked, rtol=0, atol=0)


def test_grouped_gemms_compute_gpt_oss_experts(experts, monkeypatch):
    """GPT-OSS's biased experts with the clamped activation through the grouped GEMMs (resident
    stacks and the runtime's copied batches) give the per-expert loop's result: the biases are
    added per row's group, the activation is the family's."""
    from dymoe.models.expert_math import ExpertMath

    gate_up, down, x, ids, weights = experts
    g = torch.Generator().manual_seed(5)
    gate_up_bias = torch.randn(E, 2 * I, generator=g).to(torch.bfloat16)
    down_bias = torch.randn(E, H, generator=g).to(torch.bfloat16)
    math = ExpertMath("gpt_oss", bias=True, limit=0.5, alpha=1.702)  # a limit the random weights reach
    stacks = (gate_up, down, gate_up_bias, down_bias)
    loop = run_grouped(x, ids, weights, lambda e: tuple(t[e] for t in stacks), math=math)
    plain = run_grouped(x, ids, weights, lambda e: (gate_up[e], down[e]))
    assert (loop.float() - plain.float()).abs().max() > 0.1  # the biases and the activation matter here
    monkeypatch.setattr(expert_compute, "grouped_mm_usable", lambda t: True)
    monkeypatch.setattr(expert_compute, "GROUPED_BYTES", 2 * sum(t[0].nbytes for t in stacks))  # 2 per batch
    batched = run_grouped(x, ids, weights, lambda e: tuple(t[e].clone() for t in stacks), math=math)
    whole = grouped_prefill(x, ids, weights, gate_up, down, (gate_up_bias, down_bias), math)
    for got in (batched, whole):  # bf16: the loop adds each bias inside its matmul, these after it
        torch.testing.assert_close(got.float(), loop.float(), rtol=2e-2, atol=2e-2)


def test_grouped_decode_equals_the_gathered_decode(experts, monkeypatch):
    """One token through the whole stacks as k one-row groups gives the gathered decode's result,
    plain and with GPT-OSS's biases and activation, for unsorted expert ids (summed in the same
    order; the grouped GEMMs may round differently); ResidentExperts and an offloading runtime's
    bf16 slots (decode_experts) take that path unless DYMOE_RESIDENT_DECODE=gather (where the
    fused kernels do not apply: the default ``auto`` and ``kernels`` fall back to it), only where
    grouped GEMMs run and only for stacks of at most MAX_GROUPS experts
    (torch._grouped_mm's limit: a larger pool decodes gathered, or on the CPU looped, one product
    per expert, which also equals the gathered decode); a bad setting is one clear error."""
    from dymoe.errors import InputError
    from dymoe.models.expert_math import ExpertMath
    from dymoe.runtime import resident
    from dymoe.runtime.resident import ResidentExperts, decode_experts, gathered_decode, grouped_decode, looped_decode

    gate_up, down, x, _, _ = experts
    ids = torch.tensor([4, 0, 3])  # not sorted; experts 1, 2, 5: empty groups
    weights = torch.tensor([0.5, 0.3, 0.2]).to(torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    biases = (torch.randn(E, 2 * I, generator=g).to(torch.bfloat16), torch.randn(E, H, generator=g).to(torch.bfloat16))
    for math, bias in ((resident.SWIGLU, None), (ExpertMath("gpt_oss", bias=True, limit=0.5, alpha=1.702), biases)):
        gathered = gathered_decode(x[:1], ids, weights, gate_up, down, biases=bias, math=math)
        grouped = grouped_decode(x[:1], ids, weights, gate_up, down, bias, math)
        looped = looped_decode(x[:1], ids, weights, gate_up, down, biases=bias, math=math)
        assert grouped.shape == gathered.shape == looped.shape == (1, H)
        torch.testing.assert_close(grouped.float(), gathered.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(looped.float(), gathered.float(), rtol=2e-2, atol=2e-2)
        assert gathered.float().abs().max() > 0.1
        cast = looped_decode(x[:1].float(), ids, weights.float(), gate_up, down, torch.float32, bias, math)
        torch.testing.assert_close(cast, gathered_decode(x[:1].float(), ids, weights.float(), gate_up, down,
                                                         torch.float32, bias, math))
    calls = []
    monkeypatch.setattr(resident, "grouped_mm_usable", lambda t: True)
    monkeypatch.setattr(resident, "grouped_decode", lambda *a: calls.append("grouped") or a[0])
    runtime = ResidentExperts({0: (gate_up, down)})
    for setting, expected in (("gather", []), ("grouped", ["grouped"]), ("auto", ["grouped"]),
                              ("kernels", ["grouped"])):  # (the CPU: no fused kernels there)
        monkeypatch.setattr(resident, "DECODE", setting)
        calls.clear()
        runtime.run_experts(0, x[:1], ids[None], weights[None])
        assert calls == expected
        calls.clear()
        decode_experts(x[:1], ids, weights, gate_up, down, torch.bfloat16)  # a runtime's bf16 slot stacks
        decode_experts(x[:1].float(), ids, weights.float(), gate_up, down, torch.float32)  # a cast: gathered
        assert calls == expected
    first = resident._group_ids(E, torch.device("cpu"))  # the group ids searched: made once per size
    assert first.tolist() == list(range(E)) and resident._group_ids(E, torch.device("cpu")) is first
    monkeypatch.setattr(resident, "MAX_GROUPS", E - 1)  # a pool of more slots than grouped GEMMs take
    calls.clear()
    monkeypatch.setattr(resident, "looped_decode", lambda *a: calls.append("looped") or a[0])
    decode_experts(x[:1], ids, weights, gate_up, down, torch.bfloat16)
    assert calls == []  # these tiny experts: gathered
    monkeypatch.setattr(resident, "LOOPED_MIN_WEIGHTS", H * I)
    decode_experts(x[:1], ids, weights, gate_up, down, torch.bfloat16)
    assert calls == ["looped"]  # experts this large, on the CPU without grouped GEMMs: one product per expert
    monkeypatch.delenv("DYMOE_RESIDENT_DECODE", raising=False)
    assert resident._decode_setting() == "auto"
    monkeypatch.setenv("DYMOE_RESIDENT_DECODE", "fast")
    with pytest.raises(InputError, match="DYMOE_RESIDENT_DECODE='fast': use auto .* or kernels .* or grouped"):
        resident._decode_setting()


def test_fused_kernels_decode_bf16_on_a_gpu_by_default(monkeypatch):
    """kernels_decode: bf16 experts on a GPU with Triton decode through the fused kernels under the
    default ``auto`` and under ``kernels``, never under ``grouped`` or ``gather``, never for other
    dtypes, before compute capability 8.0 or without Triton; on the CPU only under Triton's
    interpreter with ``kernels`` said outright (the tests' way in), so a CPU run with Triton
    installed keeps the grouped decode."""
    from dymoe.quant import kernels
    from dymoe.runtime import resident

    for module in (kernels, resident):
        monkeypatch.setattr(module, "triton_available", lambda: True)
    monkeypatch.setattr(kernels, "_capability", lambda device: (9, 0))
    interpreted = [False]
    monkeypatch.setattr(resident, "interpreting", lambda: interpreted[0])
    for setting, gpu in (("auto", True), ("kernels", True), ("grouped", False), ("gather", False)):
        monkeypatch.setattr(resident, "DECODE", setting)
        assert resident.kernels_decode("cuda", torch.bfloat16) is gpu
        assert resident.kernels_decode("cuda", torch.float32) is False
        assert resident.kernels_decode("cpu", torch.bfloat16) is False
        interpreted[0] = True
        assert resident.kernels_decode("cpu", torch.bfloat16) is (setting == "kernels")
        interpreted[0] = False
    monkeypatch.setattr(resident, "DECODE", "auto")
    monkeypatch.setattr(kernels, "_capability", lambda device: (7, 5))  # Turing: no bf16 tensor-core tiles
    assert resident.kernels_decode("cuda", torch.bfloat16) is False
    monkeypatch.setattr(kernels, "_capability", lambda device: (8, 0))
    assert resident.kernels_decode("cuda", torch.bfloat16) is True
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert resident.kernels_decode("cuda", torch.bfloat16) is False


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_from_checkpoint_loads_straight_into_the_blobs(family, tmp_path, monkeypatch):
    """Where the fused kernels decode, ``from_checkpoint`` copies each layer from the host straight
    into its blob buffer (no second device copy of a layer): every stack is a view of its layer's
    buffer holding the checkpoint's values (biases too), the constructor keeps those blobs instead
    of building new ones, and the byte count is the buffers'. Built on the CPU here (the decision
    forced), where a host-to-host copy stands in for the upload."""
    from dymoe.runtime import resident
    from tests.tiny_models import tiny_store

    checkpoint, _ = tiny_store(tmp_path, family, 3, ("bf16",))
    plain = resident.ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.bfloat16)
    assert plain._blobs == {}  # the CPU decodes otherwise
    monkeypatch.setattr(resident, "kernels_decode", lambda device, dtype: True)
    built = []
    as_blobs = resident._as_blobs
    monkeypatch.setattr(resident, "_as_blobs", lambda *a: built.append(a[1]) or as_blobs(*a))
    runtime = resident.ResidentExperts.from_checkpoint(checkpoint, "cpu", torch.bfloat16)
    layers = checkpoint.config.moe_layers
    assert built == ["cpu"] * len(layers)  # once per layer, by from_checkpoint, none by the constructor
    assert sorted(runtime._blobs) == sorted(layers) and sorted(runtime.layers) == sorted(layers)
    for layer in layers:
        buffer = runtime._blobs[layer][0]
        stacks, expected = runtime.layers[layer], plain.layers[layer]
        assert len(stacks) == len(expected) == (4 if family == "gpt_oss" else 2)
        for view, values in zip(stacks, expected):
            assert view.untyped_storage().data_ptr() == buffer.data_ptr()
            assert torch.equal(view, values)
    assert runtime.nbytes == sum(buffer.nbytes for buffer, _, _ in runtime._blobs.values()) >= plain.nbytes
