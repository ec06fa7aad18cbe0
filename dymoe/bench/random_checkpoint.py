"""A small random-weight checkpoint of a real architecture, written to disk with a real tokenizer.

It stands in for a trained model where none can be downloaded (the untrained demo, CLI tests):
every file a hub checkpoint has is there (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a ChatML template, generation_config.json), so it goes through exactly
the code a real checkpoint does. Its text is gibberish: it is labelled untrained everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dymoe.checkpoint.writer import save_checkpoint, write_atomic
from dymoe.models.registry import parse_config
from dymoe.models.transformer import MoETransformer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen3_moe_config(vocab_size: int, **overrides) -> dict:
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab_size,
        "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 16,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16",
        "bos_token_id": None, "eos_token_id": 0,
    }
    config.update(overrides)
    return config


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (Qwen/GPT-2 style) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def write_tokenizer_files(path: Path, tokenizer) -> None:
    tokenizer.save(str(path / "tokenizer.json"))
    write_atomic(path / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHATML,
        "model_max_length": 2048,
    }, indent=2) + "\n")


def random_tensors(raw_config: dict, seed: int, std: float = 0.08) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, per-expert layout, bf16, from a seeded generator."""
    config = parse_config(raw_config)
    with torch.device("meta"):
        model = MoETransformer(config, context_len=8)
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    h, i = config.hidden_size, config.moe_intermediate_size
    for layer in config.moe_layers:
        for e in range(config.num_experts):
            prefix = f"model.layers.{layer}.mlp.experts.{e}."
            shapes.update({prefix + "gate_proj.weight": (i, h), prefix + "up_proj.weight": (i, h),
                           prefix + "down_proj.weight": (h, i)})
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * std
    return {k: v.to(torch.bfloat16) for k, v in tensors.items()}


def write_random_checkpoint(path: Path, texts: list[str], vocab_size: int = 1024, seed: int = 0, **shape) -> Path:
    """Write a complete random-weight Qwen3-MoE checkpoint folder at ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size)
    eos = tokenizer.token_to_id("<|im_end|>")
    raw = qwen3_moe_config(tokenizer.get_vocab_size(), eos_token_id=eos, **shape)
    write_tokenizer_files(path, tokenizer)
    write_atomic(path / "generation_config.json", json.dumps({"eos_token_id": [eos], "do_sample": False}) + "\n")
    return save_checkpoint(path, raw, random_tensors(raw, seed))
