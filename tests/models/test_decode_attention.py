"""One decode token's attention split over the keys (dymoe/models/decode_attention.py), against a
float64 reference: under Triton's interpreter on the CPU, and compiled on a GPU."""

from __future__ import annotations

from tests.interpreted import needs_gpu, needs_triton, run_interpreted


# (key-value heads, query heads per kv head, head dim, value head dim, span, cache length, position,
# programs, window, sinks): several chunks with the last ones past the position, a lone visible key,
# odd group and head sizes, every key visible, a chunk of two blocks, DeepSeek's 192/128 head dims,
# GPT-OSS's windows and sinks, and heads of 8 (padded to 16)
CASES = [
    (2, 4, 64, 64, 128, 160, 100, 8, None, False),
    (1, 1, 32, 32, 64, 64, 0, 8, None, False),
    (2, 3, 48, 32, 256, 256, 255, 8, None, False),
    (1, 2, 64, 64, 512, 600, 300, 4, None, False),
    (1, 2, 192, 128, 128, 128, 77, 8, None, False),
    (2, 2, 64, 64, 512, 512, 300, 8, 100, True),  # GPT-OSS: a window and sinks, whole chunks outside
    (1, 4, 64, 64, 256, 256, 40, 8, 128, True),  # a window wider than the keys so far
    (2, 2, 64, 64, 128, 128, 90, 8, 1, False),  # only the token's own key
    (2, 2, 8, 8, 128, 128, 70, 8, None, False),  # heads narrower than tl.dot's 16 (the tests' tiny models)
]

SCRIPT = """
import json, torch
from dymoe.models.decode_attention import chunking, decode_attention

device = {device!r}
torch.manual_seed(0)
out = []
for hkv, groups, d, dv, span, length, index, programs, window, sinks in {cases!r}:
    h = hkv * groups
    sinks = torch.randn(h, dtype=torch.bfloat16, device=device) * 2 if sinks else None
    q = torch.randn(1, 1, h, d, dtype=torch.bfloat16, device=device).transpose(1, 2)  # strided, as after rotary
    k = torch.randn(1, hkv, length, d, dtype=torch.bfloat16, device=device)[:, :, :span]
    v = torch.randn(1, hkv, length, dv, dtype=torch.bfloat16, device=device)[:, :, :span]
    k[:, :, index + 1:] = float("nan")  # keys past the position are never read (not even as 0 * NaN)
    v[:, :, index + 1:] = float("nan")
    scale = d ** -0.5
    first = 0 if window is None else max(0, index - window + 1)
    k[:, :, :first] = float("nan")  # nor those before the window
    v[:, :, :first] = float("nan")
    got = decode_attention(q, k, v, torch.tensor([index], device=device), scale, programs, sinks, window)
    again = decode_attention(q, k, v, torch.tensor([index], device=device), scale, programs, sinks, window)
    keys, values = (t[0, :, first : index + 1].double().repeat_interleave(groups, 0) for t in (k, v))
    scores = torch.einsum("hd,hnd->hn", q[0, :, 0].double(), keys) * scale
    if sinks is not None:
        scores = torch.cat([scores, sinks.double()[:, None]], -1)
    probs = torch.softmax(scores, -1)[:, : keys.shape[1]]
    want = torch.einsum("hn,hnd->hd", probs, values)
    error = ((got[0, :, 0].double() - want).abs().max() / want.abs().max()).item()
    out.append(dict(case=[hkv, groups, d, dv, span, index], shape=list(got.shape), dtype=str(got.dtype),
                    error=error, finite=bool(torch.isfinite(got).all()), splits=chunking(span, hkv, programs)[1],
                    again=torch.equal(again, got)))
from dymoe.models.fused import _COUNTERS
print(json.dumps(dict(cases=out, counters=[int(c.abs().sum()) for c in _COUNTERS.values()])))
"""


def _check(found) -> None:
    """Each case to bf16 accuracy of float64; a second call the same (each head's last chunk, which
    combines, left its counter at zero: all counters are zero after the run)."""
    results = found["cases"]
    assert [r["splits"] for r in results] == [2, 1, 4, 4, 2, 4, 4, 2, 2]
    for r, (hkv, groups, d, dv, *_) in zip(results, CASES):
        assert r["shape"] == [1, hkv * groups, 1, dv] and r["dtype"] == "torch.bfloat16", r
        assert r["finite"] and r["error"] < 1e-2 and r["again"], r
    assert found["counters"] == [0]


@needs_triton
def test_decode_attention_matches_the_reference_under_the_interpreter():
    _check(run_interpreted(SCRIPT.format(device="cpu", cases=CASES)))


@needs_gpu
def test_decode_attention_matches_the_reference_on_the_gpu():
    _check(run_interpreted(SCRIPT.format(device="cuda", cases=CASES), interpret=False))


GRAPH_SCRIPT = """
import json, torch
from dymoe.models import fused, layers
from dymoe.models.layers import StaticPosition, _attend, attend_with_sinks

torch.manual_seed(1)
span, index = 128, 70
q = torch.randn(1, 8, 1, 64, dtype=torch.bfloat16)
k = torch.randn(1, 2, span, 64, dtype=torch.bfloat16)
v = torch.randn(1, 2, span, 64, dtype=torch.bfloat16)
position = torch.tensor([index])
start = StaticPosition(position, span, (torch.arange(span) <= position).view(1, span))
sinks = torch.randn(8, dtype=torch.bfloat16)
split = _attend(q, k, v, start), attend_with_sinks(q, k, v, start, sinks, 32)
fused.ATTENTION = "sdpa"
masked = _attend(q, k, v, start), attend_with_sinks(q, k, v, start, sinks, 32)
keys, values = (t[0, :, index - 31 : index + 1].double().repeat_interleave(4, 0) for t in (k, v))
scores = torch.cat([torch.einsum("hd,hnd->hn", q[0, :, 0].double(), keys) / 8, sinks.double()[:, None]], -1)
exact = torch.einsum("hn,hnd->hd", torch.softmax(scores, -1)[:, :32], values)
error = lambda a, b: ((a.double() - b.double()).abs().max() / b.abs().max()).item()
print(json.dumps(dict(applies=fused.ATTENTION == "sdpa" and fused.decode_attention_applies(q),
                      shapes=[list(t.shape) for t in split], errors=[error(a, b) for a, b in zip(split, masked)],
                      exact=[error(split[1][0, :, 0], exact), error(masked[1][0, :, 0], exact)])))
"""


@needs_triton
def test_the_graph_decode_attends_through_the_split_kernel():
    """``_attend`` and GPT-OSS's ``attend_with_sinks`` (a 32-key window and sinks) with a
    device-held position (the graph decode) take the split kernel, to bf16 rounding of SDPA's
    masked attention and the written-out one; ``DYMOE_DECODE_ATTENTION=sdpa`` turns it off."""
    result = run_interpreted(GRAPH_SCRIPT)
    assert result["shapes"] == [[1, 8, 1, 64]] * 2 and not result["applies"]
    assert all(0 < error < 2e-2 for error in result["errors"]), result  # not bit-equal: not the other path
    # against float64 the kernel is the closer (the written-out path rounds its scores to bf16)
    assert result["exact"][0] < 1e-2 and result["exact"][0] <= result["exact"][1], result
