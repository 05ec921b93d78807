"""`sloserve profile`: measure step latency on this hardware and write a latency profile."""

from __future__ import annotations

import logging
import random
import statistics
import time
from typing import TYPE_CHECKING

from sloserve.core.latency import LatencyModel
from sloserve.request import SamplingParams

if TYPE_CHECKING:
    from sloserve.engine import LLMEngine

log = logging.getLogger("sloserve.profiler")
ATTENTION_PROBE_TOKENS = 4096


class _Prompts:
    """Fresh random prompts, so the prefix cache never shortens a measurement."""

    def __init__(self, vocab: int, seed: int = 0):
        self.rng, self.vocab = random.Random(seed), vocab

    def __call__(self, length: int) -> list[int]:
        return [self.rng.randrange(100, self.vocab) for _ in range(length)]


def _decode_step_time(engine: LLMEngine, prompts: _Prompts, batch: int, context: int,
                      steps: int) -> float:
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True, temperature=0)
    requests = [engine.add_request(prompts(context), params) for _ in range(batch)]
    while any(r.num_output_tokens == 0 for r in requests):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for r in requests:
        engine.abort(r.request_id)
    return statistics.median(times)


def _prefill_time(engine: LLMEngine, prompts: _Prompts, tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        request = engine.add_request(prompts(tokens), SamplingParams(max_tokens=1))
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        times.append(time.perf_counter() - start)
        assert request.num_output_tokens == 1
    return statistics.median(times)


def _prompt_token_cost(engine: LLMEngine, prompts: _Prompts, batch: int, context: int,
                       prompt_tokens: int, decode_s: float, repeats: int = 3) -> float:
    """Seconds a prompt token adds to a step that also decodes `batch` requests."""
    params = SamplingParams(max_tokens=2 * repeats + 4, ignore_eos=True, temperature=0)
    requests = [engine.add_request(prompts(context), params) for _ in range(batch)]
    while any(r.num_output_tokens == 0 for r in requests):
        engine.step()
    times = []
    for _ in range(repeats):
        engine.add_request(prompts(prompt_tokens), SamplingParams(max_tokens=1))
        start = time.perf_counter()
        engine.step()  # the decodes and the whole prompt, in one step
        times.append(time.perf_counter() - start)
    for r in requests:
        engine.abort(r.request_id)
    return max(0.0, statistics.median(times) - decode_s) / prompt_tokens


def profile(engine: LLMEngine, batch_sizes: list[int], prefill_tokens: list[int],
            context: int = 128, steps: int = 6, mixed_prompt_tokens: int = 64) -> LatencyModel:
    prompts = _Prompts(engine.model_config.vocab_size)
    _decode_step_time(engine, prompts, 2, 16, 2)  # warm-up
    decode = [_decode_step_time(engine, prompts, b, context, steps) for b in batch_sizes]
    probe = batch_sizes[len(batch_sizes) // 2]
    long_context = 4 * context
    slope = (_decode_step_time(engine, prompts, probe, long_context, steps)
             - decode[len(batch_sizes) // 2]) / (probe * (long_context - context))
    prefill = [_prefill_time(engine, prompts, n, 3) for n in prefill_tokens]
    mixed_batch = batch_sizes[::2]
    mixed = [_prompt_token_cost(engine, prompts, b, context, mixed_prompt_tokens,
                                decode[batch_sizes.index(b)]) for b in mixed_batch]
    return LatencyModel(tuple(batch_sizes), tuple(decode), tuple(prefill_tokens), tuple(prefill),
                        context, max(slope, 0.0), tuple(mixed_batch), tuple(mixed),
                        source=f"sloserve profile, {engine.model_name}",
                        attention_s_per_pair=attention_cost(prefill_tokens, prefill))


def attention_cost(tokens: list[int], seconds: list[float]) -> float:
    """Seconds per causal-attention pair, from the two longest prefills, t(n) = a n + c n^2/2:
    what the cost per token gains with length. Prompts under ~2k tokens show launch costs and
    weight reads instead: 0 (no term) unless the longest reaches ATTENTION_PROBE_TOKENS."""
    if len(tokens) < 2 or max(tokens) < ATTENTION_PROBE_TOKENS:
        return 0.0
    (n1, t1), (n2, t2) = sorted(zip(tokens, seconds))[-2:]
    return max(0.0, 2 * (t2 / n2 - t1 / n1) / (n2 - n1))


def calibrate(engine: LLMEngine) -> None:
    """Give an engine whose policy prices steps a profile of this machine, measured now (a
    few seconds before serving), when none was shipped for it."""
    if engine.needs_latency_profile:
        log.info("measuring this machine's step latency for the %s policy",
                 engine.config.scheduler.policy)
        # a GPU prefills 8k tokens in a blink; the two long ones show attention's growth
        long = [n for n in (2048, 8192) if n < engine.max_model_len
                and engine.runner.device.type == "cuda"]
        engine.use_latency_profile(profile(engine, [1, 8, 32], [32, 256, *long], steps=3))
