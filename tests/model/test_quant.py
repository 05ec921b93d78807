"""4-bit weights: the grid round-trips, the kernel multiplies by that grid, the 4-bit-ranked
head keeps float logits where they decide, and the quantized embedded model still answers
like the float one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sloserve import LLM, SamplingParams
from sloserve.model.quant import (
    GROUP,
    Int4Linear,
    QuantizedHead,
    dequantize_groups,
    int4_available,
    quantize_groups,
)
from tests.conftest import chat

pytestmark = pytest.mark.skipif(not int4_available(), reason="no CPU int4 kernel in this torch")


def test_weights_on_the_grid_round_trip_exactly():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 4 * GROUP), generator=gen, dtype=torch.int32)
    codes[:, ::GROUP], codes[:, 1::GROUP] = 0, 15  # every group spans the full range
    scale = torch.rand(64, 4, generator=gen) / 10 + 0.01
    zero = torch.randn(64, 4, generator=gen) / 10
    again, scale2, zero2 = quantize_groups(dequantize_groups(codes, scale, zero))
    assert torch.equal(again, codes)
    torch.testing.assert_close(scale2, scale)
    torch.testing.assert_close(zero2, zero)


def test_int4_linear_multiplies_by_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(8 * GROUP, 96, bias=True)
    layer = Int4Linear(linear)
    codes, scale, zero = quantize_groups(linear.weight)
    reference_weight = dequantize_groups(codes, scale, zero)
    # rounding to the grid moves no weight by more than half a step
    assert ((reference_weight - linear.weight).abs() <= scale.repeat_interleave(GROUP, 1) / 2
            + 1e-6).all()
    for rows in (1, 7, 64):
        x = torch.randn(rows, 8 * GROUP)
        expected = F.linear(x, reference_weight, linear.bias)
        # activations and scales run in bfloat16: about 3 significant digits
        torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)


def test_quantized_head_gives_float_logits_at_its_top_tokens():
    """The int4 kernel ranks; the top tokens' logits are float32's, so greedy picks are."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 5000, bias=False)
    head = QuantizedHead(linear)
    for rows in (1, 3, 40):  # the int4 kernel, then the bfloat16 copy
        x = torch.randn(rows, 64) * 4
        with torch.no_grad():
            expected, logits = F.linear(x, linear.weight), head(x)
        top = expected.topk(4, dim=-1).indices
        # float32 both, summed in another order
        torch.testing.assert_close(logits.gather(1, top), expected.gather(1, top),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        # everywhere else the ranking's: 4-bit codes (<= 4 rows) are off by at most a
        # quarter of the logits' spread here, bfloat16 of the float weight far less
        assert (logits - expected).abs().max() < 0.3 * expected.std()


def test_quantized_model_answers_like_the_float_one(llm):
    quantized = LLM(quantization="int4")
    prompt = chat("What is the capital of France?")
    params = SamplingParams(max_tokens=16, temperature=0)
    text = quantized.generate([prompt], params)[0].text
    assert "Paris" in text
    assert "Paris" in llm.generate([prompt], params)[0].text
    assert quantized.engine.blocks.num_used_blocks == 0
    with pytest.raises(ValueError, match="quantization"):
        LLM(quantization="int3")
