"""Step-latency model: how long one engine step takes, from a measured profile.

`sloserve profile` measures decode steps at several batch sizes and prefill steps at several
token counts and writes a JSON profile; this module interpolates it. SLICE reads l(b) for its
cycle feasibility; the simulator advances its clock by step_time(plan). Pure Python.
"""

from __future__ import annotations

import bisect
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from sloserve.core.plan import Plan

PROFILES = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = PROFILES / "cpu-2core-smollm2-135m.json"


def _interp(xs: tuple[float, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear through (0, 0) and the points; linear extrapolation past the last."""
    if x <= 0:
        return 0.0
    xs, ys = (0.0, *xs), (0.0, *ys)
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _clamped(xs: tuple[float, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear inside the points, flat beyond them."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_left(xs, x)
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])


@dataclass(frozen=True)
class LatencyModel:
    """decode_s[i]: seconds of a step decoding decode_batch[i] requests at `decode_context`
    tokens of context each; prefill_s[i]: seconds of a step prefilling prefill_tokens[i]
    tokens; context_s_per_token: extra decode time per token of context beyond that;
    mixed_s_per_token[i]: seconds a prompt token adds to a step decoding mixed_batch[i];
    attention_s_per_pair: seconds per (prompt token, earlier token) pair of causal attention,
    the quadratic part of a long prefill that short-prompt points cannot show (a chunk deep in
    a 28k-token prompt costs ~3x its first chunk on an H200)."""

    decode_batch: tuple[int, ...]
    decode_s: tuple[float, ...]
    prefill_tokens: tuple[int, ...]
    prefill_s: tuple[float, ...]
    decode_context: int = 128
    context_s_per_token: float = 0.0
    mixed_batch: tuple[int, ...] = ()  # decode batch sizes of the mixed-step measurements
    mixed_s_per_token: tuple[float, ...] = ()  # what a prompt token adds to such a step
    source: str = ""
    attention_s_per_pair: float = 0.0

    @classmethod
    def from_file(cls, path: str | Path) -> LatencyModel:
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> LatencyModel:
        mixed = data.get("mixed", {})
        try:
            return cls(tuple(data["decode"]["batch_sizes"]), tuple(data["decode"]["seconds"]),
                       tuple(data["prefill"]["tokens"]), tuple(data["prefill"]["seconds"]),
                       data["decode"].get("context", 128),
                       data["decode"].get("context_s_per_token", 0.0),
                       tuple(mixed.get("batch_sizes", ())),
                       tuple(mixed.get("s_per_prompt_token", ())), source,
                       data["prefill"].get("attention_s_per_pair", 0.0))
        except (KeyError, TypeError) as e:
            raise ValueError(f"latency profile {source or ''} is malformed: missing {e}") from None

    @classmethod
    def default(cls) -> LatencyModel:
        return cls.from_file(DEFAULT_PROFILE)

    def to_dict(self) -> dict:
        return {"decode": {"batch_sizes": list(self.decode_batch), "seconds": list(self.decode_s),
                           "context": self.decode_context,
                           "context_s_per_token": self.context_s_per_token},
                "prefill": {"tokens": list(self.prefill_tokens), "seconds": list(self.prefill_s),
                            "attention_s_per_pair": self.attention_s_per_pair},
                "mixed": {"batch_sizes": list(self.mixed_batch),
                          "s_per_prompt_token": list(self.mixed_s_per_token)}}

    def decode_time(self, batch: int) -> float:
        """l(b): one decode step of `batch` requests at the profile's context length."""
        return _interp(self.decode_batch, self.decode_s, batch)

    def prefill_time(self, tokens: int, start: int = 0) -> float:
        """A prefill of `tokens` prompt tokens after `start` already computed ones (at least
        a step's fixed cost, one pass over the weights, as a decode of one)."""
        if tokens <= 0:
            return 0.0
        return max(self.decode_time(1), _interp(self.prefill_tokens, self._linear_prefill_s,
                                                tokens)) + self._attention(tokens, start)

    def _attention(self, tokens: int, start: int) -> float:
        return self.attention_s_per_pair * tokens * (start + tokens / 2)

    @functools.cached_property
    def _linear_prefill_s(self) -> tuple[float, ...]:
        """The profiled prefills less their attention pairs: what grows linearly."""
        return tuple(s - self._attention(n, 0) for n, s in zip(self.prefill_tokens,
                                                                 self.prefill_s))

    @property
    def _prefill_slope(self) -> float:
        """Seconds per prompt token between the two longest profiled prefills (linear part)."""
        if len(self.prefill_tokens) < 2:
            return float("inf")
        (t0, t1), (s0, s1) = self.prefill_tokens[-2:], self._linear_prefill_s[-2:]
        return (s1 - s0) / (t1 - t0)

    def decode_step_time(self, batch: int, total_context: int) -> float:
        """A decode-only step of `batch` requests attending to `total_context` tokens."""
        extra = total_context - batch * self.decode_context
        return self.decode_time(batch) + self.context_s_per_token * extra

    def step_time(self, plan: Plan) -> float:
        decodes = context = pairs = 0
        for c in plan.chunks:
            if c.is_decode:
                decodes += 1
                context += c.start + 1
            else:
                pairs += c.num_tokens * c.start  # attention to the chunks before it
        return (self.mixed_step_time(decodes, context, plan.num_batched_tokens - decodes)
                + self.attention_s_per_pair * pairs)

    def mixed_step_time(self, decodes: int, context: int, prompt_tokens: int,
                        prompt_start: int = 0) -> float:
        """A step decoding `decodes` requests (attending to `context` tokens in all) beside
        `prompt_tokens` prompt tokens from position `prompt_start`.
        A decode-only step costs l(b) plus its context beyond the profile's. Prompt tokens
        add what a prefill of them costs beyond the fixed cost of any step (about l(1): one
        pass over the weights), which decode rows already paid, and their attention to the
        `prompt_start` tokens before them."""
        if not decodes:
            return self.prefill_time(prompt_tokens, prompt_start)
        time = self.decode_step_time(decodes, context)
        if prompt_tokens and self.mixed_batch:  # measured: what a prompt token adds here
            per_token = _clamped(self.mixed_batch, self.mixed_s_per_token, decodes)
            # ...but never more than a token of a long prefill: on a GPU the mixed-step
            # measurement (few prompt tokens, an eager step next to graph-replayed decodes)
            # spreads a fixed launch cost over its tokens, 10x the real per-token cost.
            time += prompt_tokens * min(per_token, self._prefill_slope)
            time += self._attention(prompt_tokens, prompt_start)
        elif prompt_tokens:
            time += max(0.0, self.prefill_time(prompt_tokens, prompt_start) - self.decode_time(1))
        return time


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # HBM bytes/s
    flops: float  # dense bf16 FLOP/s
    memory: float  # bytes


GPUS = {
    "h100": GPU("H100 SXM", 3.35e12, 989e12, 80e9),
    "h200": GPU("H200", 4.8e12, 989e12, 141e9),
    "a100": GPU("A100 80GB", 2.0e12, 312e12, 80e9),
}


@dataclass(frozen=True)
class ModelShape:
    """What a step's cost depends on: parameters, layers, attention and KV sizes (bf16)."""

    params: int  # excluding the embedding table, which is read one row per token
    layers: int
    heads: int
    head_dim: int
    kv_heads: int
    vocab: int
    hidden: int

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


@dataclass(frozen=True)
class RooflineModel:
    """Analytic step time for hardware we cannot run: each step reads every weight once and
    each scheduled request's KV; it takes the longer of memory and compute time at the given
    efficiencies, plus a fixed per-step overhead."""

    gpu: GPU
    shape: ModelShape
    bandwidth_efficiency: float = 0.8
    compute_efficiency: float = 0.6
    step_overhead_s: float = 0.002
    decode_context: int = 1024

    def _time(self, tokens: int, kv_read_tokens: int, attention_flops: float) -> float:
        if tokens == 0:
            return 0.0
        s = self.shape
        bytes_moved = 2 * s.params + kv_read_tokens * s.kv_bytes_per_token
        flops = 2 * s.params * tokens + attention_flops
        return (max(bytes_moved / (self.gpu.bandwidth * self.bandwidth_efficiency),
                    flops / (self.gpu.flops * self.compute_efficiency)) + self.step_overhead_s)

    def _attention_flops(self, query_tokens: int, context: int) -> float:
        s = self.shape
        return 4.0 * s.layers * s.heads * s.head_dim * query_tokens * context

    def decode_time(self, batch: int) -> float:
        ctx = self.decode_context
        return self._time(batch, batch * ctx, batch * self._attention_flops(1, ctx))

    def prefill_time(self, tokens: int, start: int = 0) -> float:
        return self._time(tokens, start + tokens,
                          self._attention_flops(tokens, start + tokens / 2))

    def decode_step_time(self, batch: int, total_context: int) -> float:
        """A decode-only step of `batch` requests attending to `total_context` tokens."""
        flops = self._attention_flops(1, total_context - batch / 2)
        return self._time(batch, total_context, flops)

    def mixed_step_time(self, decodes: int, context: int, prompt_tokens: int,
                        prompt_start: int = 0) -> float:
        """As step_time for a step of `decodes` decodes attending to `context` tokens in all
        and one prompt chunk of `prompt_tokens` tokens from position `prompt_start`."""
        flops = self._attention_flops(1, context - decodes / 2) + self._attention_flops(
            prompt_tokens, prompt_start + prompt_tokens / 2)
        return self._time(decodes + prompt_tokens, context + prompt_start + prompt_tokens,
                          flops)

    def step_time(self, plan: Plan) -> float:
        if all(c.is_decode for c in plan.chunks):
            context = sum(c.start + 1 for c in plan.chunks)
            return self.decode_step_time(len(plan.chunks), context)
        tokens = kv = 0
        flops = 0.0
        for c in plan.chunks:
            context = c.start + c.num_tokens
            tokens += c.num_tokens
            kv += context
            flops += self._attention_flops(c.num_tokens, c.start + c.num_tokens / 2)
        return self._time(tokens, kv, flops)
