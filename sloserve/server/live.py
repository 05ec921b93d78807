"""The live SLO page's numbers: the last minute of finished requests, per SLO class."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from sloserve.interface import EngineStats, RequestOutput

WINDOW_S = 60.0


@dataclass(frozen=True)
class _Finished:
    at: float
    slo_class: str
    attained: bool | None  # None: the request carried no objective
    ttft: float | None
    tpot: float | None
    tokens: int


class LiveWindow:
    """Finished requests of the last WINDOW_S seconds and refusals since start. `record` runs
    on the engine's thread, `snapshot` on the event loop's: a lock keeps them apart."""

    def __init__(self, policy: str, window_s: float = WINDOW_S):
        self.policy, self.window_s = policy, window_s
        self._finished: collections.deque[_Finished] = collections.deque()
        self._refused: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def record(self, out: RequestOutput, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        slo_class = out.slo.slo_class
        with self._lock:
            if out.finish_reason == "rejected":
                self._refused[slo_class] += 1
                return
            t = out.timings
            self._finished.append(_Finished(now, slo_class, t.attained(out.slo), t.ttft,
                                            t.tpot, len(out.token_ids)))
            self._forget_before(now - self.window_s)

    def snapshot(self, stats: EngineStats, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._forget_before(now - self.window_s)
            finished, refused = list(self._finished), dict(self._refused)
        classes = {}
        for name in sorted({f.slo_class for f in finished} | set(refused)):
            mine = [f for f in finished if f.slo_class == name]
            judged = [f.attained for f in mine if f.attained is not None]
            classes[name] = {
                "finished": len(mine), "refused_total": refused.get(name, 0),
                "attainment": sum(judged) / len(judged) if judged else None,
                "ttft_ms": _percentiles([f.ttft for f in mine]),
                "tpot_ms": _percentiles([f.tpot for f in mine])}
        return {
            "policy": self.policy, "window_s": self.window_s,
            "running": stats.num_running, "waiting": stats.num_waiting - stats.num_preempted,
            "preempted": stats.num_preempted, "kv_usage": stats.kv_cache_usage,
            "output_tokens_per_s": sum(f.tokens for f in finished) / self.window_s,
            "classes": classes}

    def _forget_before(self, cutoff: float) -> None:
        while self._finished and self._finished[0].at < cutoff:
            self._finished.popleft()


def _percentiles(seconds: list[float | None]) -> dict[str, float | None]:
    values = sorted(v * 1e3 for v in seconds if v is not None)
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    pick = lambda q: round(values[min(len(values) - 1, int(q * len(values)))], 2)  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}
