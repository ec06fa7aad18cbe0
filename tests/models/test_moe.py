"""The router variants of dymoe/models/moe.py on hand-made logits: Phi-MoE's sparsemixer."""

from __future__ import annotations

import math

import pytest
import torch

from dymoe.models.moe import Router
from dymoe.models.registry import parse_config


def phimoe_router(num_experts: int, eps: float) -> Router:
    """A sparsemixer router whose logits are its input (hidden size = experts, identity weight)."""
    config = parse_config({"architectures": ["PhimoeForCausalLM"], "vocab_size": 8, "hidden_size": num_experts,
                           "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                           "num_local_experts": num_experts, "num_experts_per_tok": 2, "router_jitter_noise": eps})
    router = Router(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


def softmax_at(logits: list[float], kept: list[int], at: int) -> float:
    return math.exp(logits[at]) / sum(math.exp(logits[i]) for i in kept)


@pytest.mark.parametrize(
    "logits,ids,kept",
    [
        # far apart: each softmax keeps only its own expert
        ([3.0, 1.0, 2.9, -1.0], [0, 2], ([0], [2])),
        # near ties within 2 eps (relative): 1.99 and 1.97 join the first softmax, 1.97 the second
        ([2.0, 1.99, 1.97, 0.5], [0, 1], ([0, 1, 2], [1, 2])),
        # negative logits: the margin is relative to |logit|
        ([-1.0, -1.01, -3.0, -0.5], [3, 0], ([3], [0, 1])),
        # an exact tie: the lower index first, and the first choice never joins the second softmax
        ([1.0, 1.0, 0.0, 0.0], [0, 1], ([0, 1], [1])),
    ],
    ids=["far", "near", "negative", "tie"],
)
def test_sparsemixer_choice_and_weights(logits, ids, kept):
    router = phimoe_router(4, eps=0.01)
    got_ids, weights = router(torch.tensor([logits]))
    assert got_ids.tolist() == [ids]
    expected = [softmax_at(logits, kept[0], ids[0]), softmax_at(logits, kept[1], ids[1])]
    torch.testing.assert_close(weights, torch.tensor([expected]), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(router.predict(torch.tensor([logits])), (got_ids, weights)))


def test_the_margin_is_router_jitter_noise():
    logits = torch.tensor([[2.0, 1.9, 0.0, -2.0]])  # 1.9 is 5% below 2.0
    assert phimoe_router(4, eps=0.01)(logits)[1].tolist() == [[1.0, 1.0]]
    wide = phimoe_router(4, eps=0.03)(logits)[1]
    torch.testing.assert_close(wide, torch.tensor([[softmax_at([2.0, 1.9], [0, 1], 0), 1.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsemixer_equals_transformers(dtype):
    """Bit for bit against transformers' own sparsemixer (eval mode), in the model's dtype."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    router = phimoe_router(16, eps=0.05).to(dtype)
    logits = (torch.randn(256, 16, generator=torch.Generator().manual_seed(0)) * 0.3 + 3.0).to(dtype)
    weights, ids = sparsemixer(logits, jitter_eps=0.05, training=False)
    got_ids, got_weights = router(logits)
    assert torch.equal(got_ids, ids) and torch.equal(got_weights, weights)
    assert got_weights.dtype == dtype and (weights < 1).float().mean() > 0.3  # the masks keep more than one expert


def test_weigh_reorders_a_given_choice_and_weighs_it_like_the_router():
    """Synthetic routing hands the router its own choice of experts (dymoe/bench/routing.py)."""
    router = phimoe_router(4, eps=0.01)
    logits = torch.tensor([[2.0, 1.99, 1.97, 0.5], [0.1, 0.3, 0.2, 0.0]])
    ids, weights = router(logits)
    again = router.weigh(logits, ids.flip(-1))
    assert torch.equal(again[0], ids) and torch.equal(again[1], weights)
    other_ids, other_weights = router.weigh(logits, torch.tensor([[3, 2], [0, 3]]))
    assert other_ids.tolist() == [[2, 3], [0, 3]]  # largest logit first
    # each softmax keeps the experts above its own logit too, the earlier choice left out
    rows = logits.tolist()
    expected = [[softmax_at(rows[0], [0, 1, 2], 2), softmax_at(rows[0], [0, 1, 3], 3)],
                [softmax_at(rows[1], [0, 1, 2], 0), softmax_at(rows[1], [1, 2, 3], 3)]]
    torch.testing.assert_close(other_weights, torch.tensor(expected))
