"""4-bit weights: the grid round-trips, both kernels (torch's and cpu_decode's native one)
multiply by that grid, the 4-bit-ranked head keeps float logits where they decide, the fused
decode path computes what the layer loop does, and the quantized embedded model still answers
like the float one."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sloserve import LLM, SamplingParams
from sloserve.model import cpu_decode
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


native = pytest.mark.skipif(not cpu_decode.extension_loaded(), reason="no C++ compiler here")


@contextlib.contextmanager
def exact_activations():
    """q4_linear with float32 activations: results independent of 16-bit rounding."""
    before = torch.ops.sloserve_cpu.set_exact_activations(True)
    try:
        yield
    finally:
        torch.ops.sloserve_cpu.set_exact_activations(before)


@native
def test_native_q4_matmul_multiplies_by_the_dequantized_weight():
    """cpu_decode.cpp's q4_linear rounds activations to 16 bits per group of 32: within
    0.2% of the largest output (0.04-0.07% seen), where torch's int4 kernel (bfloat16
    activations and scales) lands within 0.5%; with float activations, float32's
    rounding of the grid (its scales and minima in float16). 1 to 8 rows (blocks of four and
    a remainder), a width no multiple of 16."""
    torch.manual_seed(0)
    linear = nn.Linear(6 * GROUP, 100, bias=True)
    layer = Int4Linear(linear)
    codes, scale, zero = quantize_groups(linear.weight)
    minimum = (zero - 8 * scale).half().float()  # the kernel's float16 scale and minimum
    reference_weight = (codes.float().reshape(100, 6, GROUP) * scale.half().float()[..., None]
                        + minimum[..., None]).reshape(100, 6 * GROUP)
    for rows in (1, 3, 5, 8):
        x = torch.randn(rows, 6 * GROUP)
        expected = F.linear(x, reference_weight)
        error = (layer.q4(x) - expected).abs().max()
        assert 0 < error <= 0.002 * expected.abs().max(), rows
        with exact_activations():
            torch.testing.assert_close(layer.q4(x), expected, rtol=1e-5, atol=1e-5)
    layer.native = True
    x = torch.randn(2, 6 * GROUP)
    torch.testing.assert_close(layer(x), layer.q4(x) + linear.bias)


@native
def test_fused_decode_computes_what_the_layer_loop_does():
    """Two streams decoding side by side (two rows, two contexts): every layer in C++ gives
    the Python layer loop's tokens and log-probabilities over the same matmuls (float
    activations, so that only summation order differs)."""
    quantized = LLM(quantization="int4")
    model = quantized.engine.runner.model
    assert model.fused_decode is not None
    prompts = [chat("Which city is the capital of France?"), "Once upon a time, in a land"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)
    fused_decode = model.fused_decode
    with exact_activations():
        fused = quantized.generate(prompts, params)
        model.fused_decode = None
        try:
            looped = quantized.generate(prompts, params)
        finally:
            model.fused_decode = fused_decode
    for a, b in zip(fused, looped):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) < 1e-3
    assert quantized.engine.blocks.num_used_blocks == 0


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
    # not "What is ...?": its first token is a near tie ("The" -1.88, "L" -1.96 in float32)
    # that a 4-bit model may break either way, depending on the CPU's kernels
    prompt = chat("Which city is the capital of France?")
    params = SamplingParams(max_tokens=16, temperature=0)
    text = quantized.generate([prompt], params)[0].text
    assert "Paris" in text
    assert "Paris" in llm.generate([prompt], params)[0].text
    assert quantized.engine.blocks.num_used_blocks == 0
    with pytest.raises(ValueError, match="quantization"):
        LLM(quantization="int3")
