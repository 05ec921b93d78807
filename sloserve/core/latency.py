"""Step-latency model: how long one engine step takes, from a measured profile.

`sloserve profile` measures decode steps at several batch sizes and prefill steps at several
token counts and writes a JSON profile; this module interpolates it. SLICE reads l(b) for its
cycle feasibility; the simulator advances its clock by step_time(plan). Pure Python.
"""

from __future__ import annotations

import bisect
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


@dataclass(frozen=True)
class LatencyModel:
    """decode_s[i]: seconds of a step decoding decode_batch[i] requests at `decode_context`
    tokens of context each; prefill_s[i]: seconds of a step prefilling prefill_tokens[i]
    tokens; context_s_per_token: extra decode time per token of context beyond that."""

    decode_batch: tuple[int, ...]
    decode_s: tuple[float, ...]
    prefill_tokens: tuple[int, ...]
    prefill_s: tuple[float, ...]
    decode_context: int = 128
    context_s_per_token: float = 0.0
    source: str = ""

    @classmethod
    def from_file(cls, path: str | Path) -> LatencyModel:
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> LatencyModel:
        try:
            return cls(tuple(data["decode"]["batch_sizes"]), tuple(data["decode"]["seconds"]),
                       tuple(data["prefill"]["tokens"]), tuple(data["prefill"]["seconds"]),
                       data["decode"].get("context", 128),
                       data["decode"].get("context_s_per_token", 0.0), source)
        except (KeyError, TypeError) as e:
            raise ValueError(f"latency profile {source or ''} is malformed: missing {e}") from None

    @classmethod
    def default(cls) -> LatencyModel:
        return cls.from_file(DEFAULT_PROFILE)

    def to_dict(self) -> dict:
        return {"decode": {"batch_sizes": list(self.decode_batch), "seconds": list(self.decode_s),
                           "context": self.decode_context,
                           "context_s_per_token": self.context_s_per_token},
                "prefill": {"tokens": list(self.prefill_tokens), "seconds": list(self.prefill_s)}}

    def decode_time(self, batch: int) -> float:
        """l(b): one decode step of `batch` requests at the profile's context length."""
        return _interp(self.decode_batch, self.decode_s, batch)

    def prefill_time(self, tokens: int) -> float:
        return _interp(self.prefill_tokens, self.prefill_s, tokens)

    def step_time(self, plan: Plan) -> float:
        decodes = [c for c in plan.chunks if c.is_decode]
        prefill_tokens = plan.num_batched_tokens - len(decodes)
        extra_context = sum(c.start + 1 - self.decode_context for c in decodes)
        return (self.decode_time(len(decodes)) + self.prefill_time(prefill_tokens)
                + self.context_s_per_token * extra_context)
