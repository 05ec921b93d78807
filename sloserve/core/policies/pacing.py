"""How far to trust the step-latency model: a safety margin learned from its errors.

A policy that paces tokens exactly to an objective misses it by a hair whenever a step runs
a little longer than predicted (under load, many real-time requests missed a 50 ms TPOT by
less than 0.1 ms). The margin is a quantile of the relative error of recent predictions, so
it follows the machine: tight where steps are steady, wide where they are noisy.
"""

from __future__ import annotations

import bisect
from collections import deque

from sloserve.core.latency import LatencyModel
from sloserve.core.plan import Plan


class StepErrorMargin:
    """The `quantile` of (measured / predicted - 1) over the last `window` steps, clamped to
    [floor, ceiling]. Scale a predicted step by (1 + margin) before asking whether it fits;
    shorten a pace by the same factor."""

    def __init__(self, quantile: float = 0.9, window: int = 256, floor: float = 0.02,
                 ceiling: float = 0.5):
        if not 0 < quantile < 1 or window < 1 or not 0 <= floor <= ceiling:
            raise ValueError("margin needs 0 < quantile < 1, window >= 1, 0 <= floor <= ceiling")
        self.quantile, self.floor, self.ceiling = quantile, floor, ceiling
        self._recent: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []  # the same errors, sorted: the quantile by index

    def observe(self, predicted: float, measured: float) -> None:
        if predicted <= 0:
            return
        error = measured / predicted - 1
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._recent.append(error)
        bisect.insort(self._sorted, error)

    @property
    def value(self) -> float:
        if not self._sorted:
            return self.floor
        q = self._sorted[min(len(self._sorted) - 1, int(self.quantile * len(self._sorted)))]
        return min(self.ceiling, max(self.floor, q))


class CalibratedSteps:
    """A step-latency model corrected online: a speed factor (EWMA of measured / predicted)
    for the mean, one for decode-only steps and one for steps carrying prompt tokens (a
    profile can be off by different factors for each: one factor for both leaves every step
    mispredicted and the margin at its ceiling), and a StepErrorMargin for the spread."""

    def __init__(self, latency: LatencyModel | str | None = None, margin_quantile: float = 0.9):
        if latency is None:
            latency = LatencyModel.default()
        elif isinstance(latency, str):
            latency = LatencyModel.from_file(latency)
        self.latency = latency
        self.decode_speed = self.prompt_speed = 1.0
        self.margin = StepErrorMargin(margin_quantile)

    def decode_time(self, batch: int) -> float:
        return self.latency.decode_time(batch) * self.decode_speed

    def prefill_time(self, tokens: int, start: int = 0) -> float:
        return self.latency.prefill_time(tokens, start) * self.prompt_speed

    def mixed_step_time(self, decodes: int, context: int, prompt_tokens: int,
                        prompt_start: int = 0) -> float:
        """A step of `decodes` decodes attending to `context` tokens in all, beside a
        prompt chunk of `prompt_tokens` from position `prompt_start`."""
        speed = self.prompt_speed if prompt_tokens else self.decode_speed
        return self.latency.mixed_step_time(decodes, context, prompt_tokens,
                                            prompt_start) * speed

    def state(self) -> str:
        return (f"steps take x{self.decode_speed:.2f} (decode) / x{self.prompt_speed:.2f} "
                f"(with prompts) the profile's, margin {self.margin.value:.0%}")

    def observe(self, plan: Plan, step_time: float) -> None:
        predicted = self.latency.step_time(plan)
        if predicted <= 0:
            return
        decode_only = all(c.is_decode for c in plan.chunks)
        speed = self.decode_speed if decode_only else self.prompt_speed
        self.margin.observe(predicted * speed, step_time)
        # one step's ratio moves the factor by at most 10% of itself: the first step after
        # start (lazy initialisation: 225x its prediction on an H200) must not set it
        ratio = min(2 * speed, max(speed / 2, step_time / predicted))
        speed += 0.1 * (ratio - speed)
        if decode_only:
            self.decode_speed = speed
        else:
            self.prompt_speed = speed
