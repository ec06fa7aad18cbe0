"""MXFP4 (GPT-OSS's published expert format) read back exactly: by hand and against transformers."""

from __future__ import annotations

import pytest
import torch

from dymoe.quant.mxfp4 import dequantize_mxfp4


def test_one_block_by_hand():
    """Byte j holds codes (low nibble first); scale byte 125 is 2**-2."""
    codes = [1, 2, 3, 4, 5, 6, 7, 0, 8, 9, 10, 11, 12, 13, 14, 15] * 2  # 0.5 .. 6, 0, -0 .. -6
    pairs = [codes[i] | (codes[i + 1] << 4) for i in range(0, 32, 2)]
    blocks = torch.tensor([[pairs]], dtype=torch.uint8)  # [1 row, 1 block, 16 bytes]
    scales = torch.tensor([[125]], dtype=torch.uint8)
    values = dequantize_mxfp4(blocks, scales, torch.float32)[0]
    e2m1 = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0, 5: 3.0, 6: 4.0, 7: 6.0}
    expected = [(-1 if c & 8 else 1) * e2m1[c & 7] / 4 for c in codes]
    assert values.tolist() == expected
    assert not torch.signbit(values[7]) and torch.signbit(values[8])  # codes 0 and 8: +0.0 and -0.0


def test_scales_are_powers_of_two_per_block():
    blocks = torch.full((1, 2, 16), 0x22, dtype=torch.uint8)  # every code 2 (= 1.0)
    scales = torch.tensor([[127, 130]], dtype=torch.uint8)
    values = dequantize_mxfp4(blocks, scales, torch.float32)
    assert values.shape == (1, 64)
    assert values[0, :32].eq(1.0).all() and values[0, 32:].eq(8.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_transformers_dequantization(dtype):
    """transformers' loader (integrations/mxfp4.py) returns [E, in, out]; ours stays [E, out, in]."""
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 140, (3, 10, 4), dtype=torch.uint8, generator=gen)
    theirs = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    ours = dequantize_mxfp4(blocks, scales, dtype)
    assert ours.shape == (3, 10, 128) and ours.dtype == dtype
    assert torch.equal(ours.transpose(1, 2), theirs)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(torch.zeros(2, 3, 16), torch.zeros(2, 3, dtype=torch.uint8))
