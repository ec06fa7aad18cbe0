"""The demo model's tools: what tools/train_demo_model.py trains is what transformers and dymoe run, and
tools/prepare_demo_corpus.py turns reST into plain text."""

from __future__ import annotations

from dataclasses import replace

import torch

from tests.models.test_parity import load_ours
from tests.scripts import load_script


def load_tool(name: str):
    return load_script("tools", name)


def test_trained_architecture_is_qwen3_moe(tmp_path):
    """The exported folder loads in transformers and dymoe, and both compute the training model's logits."""
    from transformers import Qwen3MoeForCausalLM

    train = load_tool("train_demo_model")
    texts = ["The interpreter reads a line, compiles it and runs it. " * 20, "def f(x):\n    return x + 1\n" * 20]
    tokenizer = train.train_tokenizer(texts, 300)
    shape = replace(train.TINY[0], vocab_size=tokenizer.get_vocab_size(), context=64)
    torch.manual_seed(0)
    model = train.DemoMoE(shape).eval()
    with torch.no_grad():  # round to bf16 first: the folder holds bf16 weights
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float() * 8)  # large enough that routing differs between tokens
    folder = train.write_folder(tmp_path / "demo", model, tokenizer)
    tokens = torch.randint(0, shape.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, routings = model(tokens)
        hf = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(tokens).logits
    ours = load_ours(folder, context_len=64)
    actual = ours(tokens, 0, ours.new_cache(2))
    for other in (hf, actual):
        assert (other - expected).abs().max() / expected.abs().max() < 1e-4
    assert len(set(routings[0].ids[:, 0].tolist())) > 1


def test_rst_to_text_keeps_prose_and_drops_markup():
    corpus = load_tool("prepare_demo_corpus")
    source = (
        ".. _tut-if:\n\n:keyword:`!if` Statements\n=========================\n\n"
        ".. index::\n   statement: for\n\nUse :func:`~os.path.join` or :ref:`the tutorial <tut-if>`, "
        "not ``eval``. For example::\n\n   >>> x = 1\n\n.. versionadded:: 3.2\n"
    )
    text = corpus.rst_to_text(source)
    assert text == (
        "if Statements\n\nUse join or the tutorial, not eval. For example:\n\n   >>> x = 1\n\nNew in version 3.2.\n"
    )
