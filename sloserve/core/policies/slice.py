"""SLICE: utility-driven task selection plus per-task decode-rate control by a token mask.

Stage 1 picks the tasks to serve: in order of utility rate r = utility x required decode rate,
a task joins while the decode cycle stays feasible under the step-latency model l(b). With the
selected rates sorted descending v_1 >= ... >= v_b, decoding every task at its rate for one
second takes v_b l(b) + sum_j (v_j - v_{j+1}) l(j) = sum_j v_j (l(j) - l(j-1)) seconds, which
must fit `ratio` of that second (the rest is left for prefills).

Stage 2 controls each task's rate with a token mask: rows are the selected tasks, columns the
decode steps of one cycle of `period_ms`; a task that needs k tokens per cycle has k ones
spread evenly over the columns. Each step scans the next column and decodes exactly the rows
marked there, so fast tasks decode often and slow ones leave batch slots free. Selection and
mask are rebuilt whenever a task arrives or finishes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from sloserve.core.latency import LatencyModel
from sloserve.core.policies.base import Policy, register
from sloserve.request import Request

if TYPE_CHECKING:
    from sloserve.core.scheduler import Scheduler


def cycle_time(rates: Sequence[float], latency: LatencyModel) -> float:
    """Seconds of decoding per second of wall time for tasks at `rates` (tokens/s)."""
    ordered = sorted(rates, reverse=True)
    steps = [latency.decode_time(b) for b in range(len(ordered) + 1)]
    return sum(rate * (steps[b] - steps[b - 1]) for b, rate in enumerate(ordered, start=1))


def mask_columns(tokens_per_cycle: int, num_columns: int) -> frozenset[int]:
    """k ones spread evenly over the columns of one cycle."""
    return frozenset(i * num_columns // tokens_per_cycle for i in range(tokens_per_cycle))


@register("slice")
class SlicePolicy(Policy):
    def __init__(self, realtime_utility: float = 10.0, utility: float = 1.0,
                 period_ms: float = 1000.0, ratio: float = 0.9,
                 best_effort_tpot_ms: float = 250.0,
                 latency: LatencyModel | str | None = None):
        if not 0 < ratio <= 1 or period_ms <= 0 or best_effort_tpot_ms <= 0:
            raise ValueError("slice needs 0 < ratio <= 1, period_ms > 0, best_effort_tpot_ms > 0")
        if realtime_utility <= 0 or utility <= 0:
            raise ValueError("utilities must be positive")
        self.realtime_utility, self.utility = realtime_utility, utility
        self.period_s, self.ratio = period_ms / 1e3, ratio
        self.best_effort_tpot_ms = best_effort_tpot_ms
        if latency is None:
            latency = LatencyModel.default()
        elif isinstance(latency, str):
            latency = LatencyModel.from_file(latency)
        self.latency = latency
        self._members: frozenset[str] = frozenset()
        self.selected: list[Request] = []  # by utility rate, highest first
        self.rows: dict[str, frozenset[int]] = {}  # the mask: request id -> its columns
        self.num_columns = 1
        self.column = 0

    # ---- stage 1: task selection -------------------------------------------------------
    def rate(self, request: Request) -> float:
        """Required decode rate in tokens per second, from the TPOT objective."""
        tpot_ms = request.slo.tpot_ms or self.best_effort_tpot_ms
        return 1e3 / tpot_ms

    def utility_of(self, request: Request) -> float:
        if request.slo.utility is not None:
            return request.slo.utility
        return self.realtime_utility if request.slo.realtime else self.utility

    def utility_rate(self, request: Request) -> float:
        return self.utility_of(request) * self.rate(request)

    def select(self, candidates: Sequence[Request]) -> list[Request]:
        ordered = sorted(candidates, key=lambda r: (-self.utility_rate(r), not r.slo.realtime,
                                                    r.arrival_time))
        steps = [self.latency.decode_time(b) for b in range(len(ordered) + 1)]
        chosen: list[Request] = []
        rates: list[float] = []  # descending
        for request in ordered:
            trial = rates.copy()
            bisect.insort(trial, self.rate(request), key=lambda v: -v)
            busy = sum(v * (steps[b] - steps[b - 1]) for b, v in enumerate(trial, start=1))
            if busy <= self.ratio or not chosen:
                chosen.append(request)
                rates = trial
        return chosen

    # ---- stage 2: the token mask -------------------------------------------------------
    def build_mask(self, selected: Sequence[Request]) -> None:
        per_cycle = {r.request_id: max(1, math.ceil(self.rate(r) * self.period_s))
                     for r in selected}
        self.num_columns = max(per_cycle.values(), default=1)
        self.rows = {rid: mask_columns(k, self.num_columns) for rid, k in per_cycle.items()}
        self.column = 0

    def prepare(self, scheduler: Scheduler, now: float) -> None:
        unfinished = [*scheduler.running, *scheduler.preempted, *scheduler.waiting]
        members = frozenset(r.request_id for r in unfinished)
        if members != self._members:  # a task arrived or finished: re-plan the cycle
            self._members = members
            self.selected = self.select(unfinished)
            self.build_mask(self.selected)
        else:
            self.column = (self.column + 1) % self.num_columns

    # ---- the mechanism's questions -----------------------------------------------------
    def running_order(self, running: Sequence[Request], now: float) -> Iterable[Request]:
        """Selected tasks marked in this column, plus selected prefills still in progress;
        everything else pauses this step (keeping its KV)."""
        on = {r.request_id for r in running
              if r.num_pending_tokens > 1 or self.column in self.rows.get(r.request_id, ())}
        return [r for r in self.selected if r.request_id in on]

    def admission_order(self, preempted: Sequence[Request], waiting: Sequence[Request],
                        now: float) -> Iterable[Request]:
        queued = {r.request_id for r in preempted} | {r.request_id for r in waiting}
        chosen = [r for r in self.selected if r.request_id in queued]
        return sorted(chosen, key=lambda r: not r.slo.realtime)  # stable: real-time first

    def chunk_size(self, request: Request, num_pending: int, budget: int, step_budget: int) -> int:
        return min(num_pending, budget)  # a prompt never blocks the real-time decodes

    def pick_victim(self, candidates: Sequence[Request], now: float) -> Request:
        chosen = {r.request_id for r in self.selected}
        return min(candidates, key=lambda r: (r.request_id in chosen, self.utility_rate(r),
                                              -r.arrival_time))
