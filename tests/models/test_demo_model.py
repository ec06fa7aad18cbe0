"""The shipped demo model (models/dymoe-demo-moe) is the one that was trained, and dymoe still runs it right.

Its weights hash, its greedy completion of a fixed prompt and its perplexity on a bundled held-out
snippet were recorded by tools/train_demo_model.py (through dymoe, CPU, float32) in
``training_report.json``; a regression in the loader, the tokenizer or the expert kernels changes
them. Nothing here is skipped: a missing model folder is a failure.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dymoe.checkpoint.reader import Checkpoint
from dymoe.engine.engine import Engine, EngineConfig
from dymoe.engine.sampling import SamplingParams
from dymoe.engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "dymoe-demo-moe"
SNIPPET = ROOT / "tests" / "data" / "heldout_snippet.txt"
# Recorded and checked with the same code in float32; the margin covers other CPUs and torch builds,
# while a wrong kernel or loader moves perplexity by far more than 1%.
PERPLEXITY_MARGIN = 1.01


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return MODEL_DIR


@pytest.fixture(scope="module")
def report(model_dir) -> dict:
    path = model_dir / "training_report.json"
    if not path.is_file():
        pytest.fail(
            f"{path} not found: the demo model must ship in the repository at {model_dir} "
            "(restore it with `git checkout -- models/dymoe-demo-moe`, or retrain it with "
            "tools/train_demo_model.py as its README.md says)", pytrace=False,
        )
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tokenizer(model_dir, report) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir, report, tokenizer) -> Engine:
    config = EngineConfig(model_dir=model_dir, device="cpu", dtype="float32", progress=False)
    return Engine.load(config, eos_token_ids=tokenizer.eos_token_ids)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def perplexity(engine: Engine, ids: list[int]) -> float:
    """Every token but the first predicted once, in windows of the context length."""
    model, ctx = engine.model, engine.model.context_len
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, ctx):
        chunk = torch.tensor(ids[start : start + ctx + 1])
        logits = model(chunk[:-1].view(1, -1), 0, model.new_cache(1))[0]
        total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(total / count)


def test_weights_are_the_recorded_ones(model_dir, report):
    digest = sha256_file(model_dir / "model.safetensors")
    assert digest == report["sha256"], "model.safetensors is not the trained model training_report.json records"
    assert digest in (model_dir / "README.md").read_text(), "the model card names another model.safetensors"


def test_loads_through_the_ordinary_loader(model_dir, report):
    checkpoint = Checkpoint.open(model_dir)
    c, shape = checkpoint.config, report["shape"]
    assert (c.family, c.num_layers, c.num_experts, c.num_experts_per_tok) == (
        "qwen3_moe", shape["num_layers"], shape["num_experts"], shape["top_k"])
    assert c.moe_layers == tuple(range(c.num_layers)) and c.tie_word_embeddings
    assert not checkpoint.fused_experts  # one tensor per expert, as the hub's Qwen3-MoE checkpoints
    gate, up, down = checkpoint.expert_weights(c.num_layers - 1, c.num_experts - 1)
    assert gate.dtype == torch.bfloat16 and down.shape == (c.hidden_size, c.moe_intermediate_size)


def test_greedy_output_is_the_recorded_one(engine, tokenizer, report):
    greedy = report["greedy"]
    params = SamplingParams(max_new_tokens=greedy["max_new_tokens"])  # temperature 0: greedy
    ids = list(engine.generate(tokenizer.encode(greedy["prompt"]), params))
    assert tokenizer.decode(ids) == greedy["text"]
    assert ids == greedy["token_ids"]


def test_snippet_perplexity_within_margin(engine, tokenizer, report):
    recorded = report["snippet"]
    assert sha256_file(SNIPPET) == recorded["sha256"], f"{SNIPPET} changed since the perplexity was recorded"
    ids = tokenizer.encode(SNIPPET.read_text(encoding="utf-8"))
    assert len(ids) == recorded["tokens"]
    ppl = perplexity(engine, ids)
    limit = recorded["perplexity"] * PERPLEXITY_MARGIN
    assert ppl <= limit, f"perplexity {ppl:.3f} > recorded {recorded['perplexity']:.3f} + 1%"


def test_logits_match_transformers(model_dir, engine, tokenizer):
    """Invariant 1 on the shipped, trained weights (routing far from uniform, unlike random ones)."""
    from transformers import Qwen3MoeForCausalLM  # a test dependency: the oracle, never used at run time

    hf = Qwen3MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer.encode(SNIPPET.read_text(encoding="utf-8"))[:256]).view(1, -1)
    with torch.no_grad():
        expected = hf(ids).logits[0]
    actual = engine.model(ids, 0, engine.model.new_cache(1))[0]
    rel = (actual - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4, f"max relative logit difference {rel:.2e}"
