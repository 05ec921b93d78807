"""The engine's periodic stats line (as vLLM's): what the last interval's steps did."""

from __future__ import annotations

import logging

from sloserve.core.plan import Plan
from sloserve.interface import EngineStats

log = logging.getLogger("sloserve.engine")


class StepLog:
    """Sums steps between lines; every `interval` seconds logs one line: steps a second,
    mean step time and the share of the interval spent in steps, prompt and generated
    tokens a second, queues, KV use, refusals, and what the policy has learned."""

    def __init__(self, interval: float):
        self.interval = interval
        self._start: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.busy = 0.0
        self.prompt_tokens = self.decode_tokens = self.rejected = 0

    def record(self, plan: Plan, step_time: float, rejected: int) -> None:
        decodes = sum(c.is_decode for c in plan.chunks)
        self.steps += 1
        self.busy += step_time
        self.decode_tokens += decodes
        self.prompt_tokens += plan.num_batched_tokens - decodes
        self.rejected += rejected

    def due(self, now: float) -> bool:
        """Whether a line is due (the caller then gathers what `log` needs)."""
        if self.interval <= 0:
            return False
        if self._start is None:
            self._start = now
        return now - self._start >= self.interval

    def log(self, now: float, stats: EngineStats, policy_state: str) -> None:
        elapsed = now - self._start
        if self.steps or self.rejected:
            mean = self.busy / self.steps * 1e3 if self.steps else 0.0
            log.info("%.1f steps/s (%.1f ms, busy %.0f%%), prompt %.0f tok/s, generation "
                     "%.0f tok/s, running %d, waiting %d, KV %.0f%%, refused %d%s",
                     self.steps / elapsed, mean, 100 * self.busy / elapsed,
                     self.prompt_tokens / elapsed, self.decode_tokens / elapsed,
                     stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage,
                     self.rejected, f"; {policy_state}" if policy_state else "")
        self._start = now
        self._reset()
