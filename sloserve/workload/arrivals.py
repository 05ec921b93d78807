"""Arrival processes: Poisson, gamma (bursty), fixed interval, or a trace's own clock."""

from __future__ import annotations

import random


def arrival_times(n: int, rate: float | None = None, burstiness: float = 1.0,
                  interval: float | None = None, seed: int = 0) -> list[float]:
    """Offsets in seconds of n arrivals. `interval`: one every `interval` s. `rate` (req/s):
    gamma inter-arrivals with shape `burstiness` (1 = Poisson; < 1 burstier), as vLLM's
    benchmark does. Neither: all at once."""
    if interval is not None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        return [i * interval for i in range(n)]
    if rate is None or rate == float("inf"):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be > 0, got {rate}, {burstiness}")
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


def scaled_trace_times(timestamps: list[float], time_scale: float) -> list[float]:
    """A trace's own arrivals, rebased to 0 and stretched by `time_scale` (0.5: twice as fast)."""
    if time_scale <= 0:
        raise ValueError(f"time scale must be > 0, got {time_scale}")
    start = timestamps[0] if timestamps else 0.0
    return [(t - start) * time_scale for t in timestamps]
