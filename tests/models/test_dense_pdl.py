"""``DYMOE_DENSE_PDL``: the fused dense kernels chained by programmatic dependent launch
(:func:`dymoe.models.fused.chained`). Each kernel lets the next launch start at once and waits for
the launch before ahead of any read of its outputs, so the results are those of plain launches bit
for bit; only a GPU (Hopper or newer) runs it, which the GPU test covers."""

from __future__ import annotations

import pytest
import torch

from dymoe.models import fused
from tests.interpreted import needs_gpu, needs_triton


@needs_triton
def test_chained_launches_only_where_the_setting_and_the_gpu_allow(monkeypatch):
    """PDL and ``launch_pdl`` together on a GPU that supports them with the setting on; nothing on
    the CPU, under the interpreter, with the setting off, or on an older GPU."""
    from dymoe.quant.kernels import triton_experts

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    monkeypatch.setattr(triton_experts, "pdl_supported", lambda device: device.type == "cuda")
    monkeypatch.setattr(fused, "DENSE_PDL", True)
    assert fused.chained(gpu) == {"PDL": True, "launch_pdl": True}
    assert fused.chained(torch.device("cpu")) == {}
    monkeypatch.setattr(triton_experts, "pdl_supported", lambda device: False)  # before Hopper, or Triton < 3.4
    assert fused.chained(gpu) == {}
    monkeypatch.setattr(triton_experts, "pdl_supported", lambda device: True)
    monkeypatch.setattr(fused, "DENSE_PDL", False)
    assert fused.chained(gpu) == {}
    monkeypatch.setattr(fused, "DENSE_PDL", True)
    monkeypatch.setattr(fused, "interpreting", lambda: True)
    assert fused.chained(gpu) == {}


def test_the_setting_takes_one_and_zero_only(monkeypatch):
    from dymoe.errors import InputError

    monkeypatch.setenv("DYMOE_DENSE_PDL", "0")
    assert fused._pdl_setting() is False
    monkeypatch.delenv("DYMOE_DENSE_PDL")
    assert fused._pdl_setting() is True
    monkeypatch.setenv("DYMOE_DENSE_PDL", "yes")
    with pytest.raises(InputError, match="DYMOE_DENSE_PDL"):
        fused._pdl_setting()


@needs_gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "gpt_oss"])
def test_chained_dense_kernels_give_the_plain_launches_logits_on_the_gpu(tmp_path, monkeypatch, family):
    """Resident decode through recorded CUDA graphs (and eagerly), the dense kernels and the expert
    step's first launch chained (``DYMOE_DENSE_PDL``, ``DYMOE_EARLY_STEP``) and not: the same logits
    bit for bit over every step, across span recordings. (CI has no GPU:
    ``python -m pytest tests/models/test_dense_pdl.py`` on one.)"""
    from dymoe.checkpoint.reader import Checkpoint
    from dymoe.models import decode_graphs
    from dymoe.models.decode_graphs import DecodeGraphs
    from dymoe.models.transformer import load_dense
    from dymoe.quant.kernels import triton_experts
    from dymoe.quant.kernels.triton_experts import pdl_supported
    from dymoe.runtime.resident import ResidentExperts
    from tests.tiny_models import make_hf_model, save_checkpoint

    device = torch.device("cuda")
    if not pdl_supported(device):
        pytest.skip("programmatic dependent launch needs a Hopper or newer GPU and Triton 3.4+")
    monkeypatch.setattr(decode_graphs, "MIN_SPAN", 8)
    checkpoint = Checkpoint.open(save_checkpoint(make_hf_model(family, seed=5), tmp_path / family))
    prompt = torch.tensor([[1, 17, 42, 5, 63, 8, 29, 11]], device=device)

    def decode(chain: bool, graphs: bool) -> torch.Tensor:
        monkeypatch.setattr(fused, "DENSE_PDL", chain)
        monkeypatch.setattr(triton_experts, "EARLY_STEP", chain)  # the expert step's first launch too
        triton_experts._launches.cache_clear()
        model = load_dense(checkpoint, 64, device, torch.bfloat16)
        model.attach_experts(ResidentExperts.from_checkpoint(checkpoint, device, torch.bfloat16))
        cache = model.new_cache(1)
        logits = model(prompt, 0, cache, last_only=True)[0]
        steps = DecodeGraphs(model, cache, record=True) if graphs else None
        trail = [logits]
        for i in range(20):  # positions 8..27: spans 8, 16, 32, each recorded once, then replayed
            token, position = trail[-1].argmax().view(1, 1), prompt.shape[1] + i
            trail.append(steps.step(token, position) if graphs else model(token, position, cache, last_only=True)[0])
        return torch.stack([t.float() for t in trail])

    for graphs in (True, False):
        plain, chained = decode(False, graphs), decode(True, graphs)
        assert torch.isfinite(plain).all()
        assert torch.equal(chained, plain), (graphs, (chained - plain).abs().max().item())
    triton_experts._launches.cache_clear()
