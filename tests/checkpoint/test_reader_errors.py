"""Invariant 5 for checkpoints: each bad input ends in one clear message naming the cause."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dymoe.checkpoint.reader import Checkpoint
from dymoe.errors import CheckpointError, UnsupportedModelError
from dymoe.models.transformer import load_dense


@pytest.fixture
def ckpt_copy(tmp_path, qwen3_dir):
    dst = tmp_path / "model"
    shutil.copytree(qwen3_dir, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"model folder .*nope does not exist"):
        Checkpoint.open(tmp_path / "nope")


def test_no_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match=r"has no config.json"):
        Checkpoint.open(tmp_path / "m")


def test_pre_quantized_checkpoint_is_refused(ckpt_copy):
    """DeepSeek-V3's release is block-scaled fp8: casting its weights without the scales would load garbage."""
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"pre-quantized checkpoint \(fp8\)"):
        Checkpoint.open(ckpt_copy)


def test_unsupported_architecture_lists_supported(ckpt_copy):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as info:
        Checkpoint.open(ckpt_copy)
    message = str(info.value)
    assert "LlamaForCausalLM" in message
    for arch in ("MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        assert arch in message


def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_named(ckpt_copy):
    _rewrite(ckpt_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    checkpoint = Checkpoint.open(ckpt_copy)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.self_attn\.k_proj\.weight is missing"):
        load_dense(checkpoint, 16, "cpu", torch.float32)


def test_missing_expert_tensor_named(ckpt_copy):
    _rewrite(ckpt_copy, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight is missing"):
        Checkpoint.open(ckpt_copy).expert_weights(2, 5)


def test_misshapen_tensor_names_tensor_and_file(ckpt_copy):
    _rewrite(ckpt_copy, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(32, 16)}))
    with pytest.raises(CheckpointError) as info:
        load_dense(Checkpoint.open(ckpt_copy), 16, "cpu", torch.float32)
    message = str(info.value)
    assert "model.layers.0.self_attn.o_proj.weight" in message
    assert "model.safetensors" in message
    assert "[32, 16]" in message and "[32, 32]" in message


def test_truncated_safetensors(ckpt_copy):
    shard = ckpt_copy / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        Checkpoint.open(ckpt_copy)


def test_garbage_safetensors(ckpt_copy):
    (ckpt_copy / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(ckpt_copy)


def test_config_missing_key(ckpt_copy):
    config = json.loads((ckpt_copy / "config.json").read_text())
    del config["moe_intermediate_size"]
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"lacks the key 'moe_intermediate_size'"):
        Checkpoint.open(ckpt_copy)


def test_shard_listed_in_index_but_missing(tmp_path):
    from tests.tiny_models import make_hf_model, save_checkpoint

    path = save_checkpoint(make_hf_model("mixtral"), tmp_path / "sharded", sharded=True)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"{victim.name} is listed in model.safetensors.index.json but missing"):
        Checkpoint.open(path)
