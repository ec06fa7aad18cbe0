"""Sampling: the distributions equal transformers' logits processors in generate's order; seeds
reproduce; greedy is argmax; bad parameters name themselves."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dymoe.engine.sampling import Sampler, SamplingParams, apply_repetition_penalty, apply_top_k, apply_top_p
from dymoe.errors import InputError

VOCAB = 257


def transformers_probabilities(params: SamplingParams, logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """The distribution generate(do_sample=True) draws from: its processors, built as it builds them."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper)

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(params.temperature)))
    if params.top_k != 0:
        processors.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=params.top_p))
    return processors(previous, logits.clone()).softmax(-1)


def random_case(seed: int, batch: int = 3, history: int = 20):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, VOCAB, generator=g) * 3
    previous = torch.randint(0, VOCAB, (batch, history), generator=g)
    return logits, previous


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=10),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=0.6, top_k=40, top_p=0.8),
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.95, repetition_penalty=1.1),
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=0.5, top_p=0.05),
    SamplingParams(temperature=1.0, top_k=VOCAB + 10, repetition_penalty=0.8),
]


@pytest.mark.parametrize("params", PARAMS, ids=repr)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distribution_equals_transformers(params, seed):
    logits, previous = random_case(seed)
    ours = Sampler(params).probabilities(logits, previous)
    theirs = transformers_probabilities(params, logits, previous)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens survive the filters
    torch.testing.assert_close(ours.sum(-1), torch.ones(len(ours)))


@settings(max_examples=60, deadline=None)
@given(
    temperature=st.floats(0.05, 3.0), top_k=st.integers(0, 300), top_p=st.floats(0.01, 1.0),
    penalty=st.floats(0.5, 2.0), seed=st.integers(0, 2**31),
)
def test_distribution_equals_transformers_property(temperature, top_k, top_p, penalty, seed):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    logits, previous = random_case(seed, batch=2)
    ours = Sampler(params).probabilities(logits, previous)
    torch.testing.assert_close(ours, transformers_probabilities(params, logits, previous), rtol=0, atol=1e-6)


def test_one_dimensional_logits_and_history():
    logits, previous = random_case(5, batch=1)
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.2)
    ours = Sampler(params).probabilities(logits[0], previous[0])
    torch.testing.assert_close(ours, transformers_probabilities(params, logits, previous), rtol=0, atol=1e-7)
    token = Sampler(params).sample(logits[0], previous[0].tolist())
    assert token.dim() == 0 and token.dtype == torch.long


def test_bfloat16_logits_are_processed_in_float32():
    logits, previous = random_case(6, batch=1)
    params = SamplingParams(temperature=0.7, top_p=0.9)
    ours = Sampler(params).probabilities(logits.bfloat16(), previous)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, transformers_probabilities(params, logits.bfloat16().float(), previous),
                               rtol=0, atol=1e-7)


def test_callers_logits_are_not_modified():
    logits, previous = random_case(7)
    before = logits.clone()
    Sampler(SamplingParams(temperature=0.5, top_k=5, top_p=0.5, repetition_penalty=1.5)).sample(logits, previous)
    assert torch.equal(logits, before)


# ---- the pieces -----------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    scores = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    out = apply_repetition_penalty(scores.clone(), torch.tensor([[0, 1, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]  # seen twice, penalised once


def test_top_k_keeps_ties():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert apply_top_k(scores.clone(), 2).isfinite().tolist() == [[True, False, True, True, False]]


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = apply_top_p(probs.log(), 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert apply_top_p(probs.log(), 0.01).isfinite().tolist() == [[True, False, False, False]]


# ---- drawing --------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits, previous = random_case(3)
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=5, top_p=0.5))
    assert torch.equal(sampler.sample(logits, previous), logits.argmax(-1))
    assert sampler.sample(logits[1]).item() == logits[1].argmax().item()


def test_greedy_applies_repetition_penalty():
    logits = torch.tensor([5.0, 4.0, 1.0])
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    assert sampler.sample(logits, torch.tensor([0])).item() == 1
    assert sampler.sample(logits, torch.tensor([1])).item() == 0


def test_same_seed_same_samples():
    logits, previous = random_case(4)
    params = SamplingParams(temperature=1.5, top_p=0.99, seed=1234)
    runs = []
    for _ in range(2):
        sampler = Sampler(params)
        runs.append(torch.stack([sampler.sample(logits, previous) for _ in range(50)]))
    assert torch.equal(runs[0], runs[1])
    other = Sampler(SamplingParams(temperature=1.5, top_p=0.99, seed=4321))
    assert not torch.equal(runs[0], torch.stack([other.sample(logits, previous) for _ in range(50)]))
    assert len(set(runs[0][:, 0].tolist())) > 5  # it really samples


def test_samples_only_from_the_filtered_set():
    logits, previous = random_case(8, batch=1)
    params = SamplingParams(temperature=1.0, top_k=3, seed=0)
    sampler = Sampler(params)
    allowed = set(logits[0].topk(3).indices.tolist())
    drawn = {sampler.sample(logits[0]).item() for _ in range(200)}
    assert drawn == allowed


def test_sample_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7))
    counts = torch.bincount(torch.stack([sampler.sample(logits) for _ in range(4000)]), minlength=3).float()
    torch.testing.assert_close(counts / 4000, torch.tensor([0.6, 0.3, 0.1]), rtol=0, atol=0.03)


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("seed", -1), ("seed", 2**64), ("seed", 1.5),
    ("max_new_tokens", 0), ("max_new_tokens", -5), ("max_new_tokens", 3.0),
    ("stop", ("",)), ("stop", (1,)),
])
def test_invalid_parameters_raise_input_error(name, value):
    with pytest.raises(InputError) as info:
        SamplingParams(**{name: value})
    assert name in str(info.value)
    assert repr(value) in str(info.value) or name == "stop"


def test_defaults_are_greedy_and_valid():
    params = SamplingParams()
    assert params.greedy and params.top_k == 0 and params.top_p == 1.0 and params.repetition_penalty == 1.0
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(temperature=1, top_p=1, seed=0).seed == 0  # ints are fine where floats are
    with pytest.raises(Exception):
        params.temperature = 1.0  # frozen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_reproduces():
    logits, previous = random_case(9)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=11)
    on_gpu = Sampler(params, "cuda").probabilities(logits.cuda(), previous.cuda())
    torch.testing.assert_close(on_gpu.cpu(), Sampler(params).probabilities(logits, previous), rtol=0, atol=1e-6)
    draws = []
    for _ in range(2):
        sampler = Sampler(params, "cuda")
        draws.append(torch.stack([sampler.sample(logits.cuda(), previous.cuda()) for _ in range(20)]))
    assert torch.equal(draws[0], draws[1])
