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
import functools
import math
from collections.abc import Iterable, Sequence

from sloserve.core.latency import LatencyModel
from sloserve.core.plan import Plan
from sloserve.core.policies.base import Policy, SchedulerView, register
from sloserve.core.policies.edf import next_deadline
from sloserve.request import Request

MAX_MISSES = 32


def cycle_time(rates: Sequence[float], latency: LatencyModel) -> float:
    """Seconds of decoding per second of wall time for tasks at `rates` (tokens/s)."""
    return _busy(sorted(rates, reverse=True),
                 [latency.decode_time(b) for b in range(len(rates) + 1)])


def _busy(rates_descending: Sequence[float], steps: Sequence[float]) -> float:
    """sum_j v_j (l(j) - l(j-1)), with steps[b] = l(b)."""
    return sum(v * (steps[b] - steps[b - 1]) for b, v in enumerate(rates_descending, start=1))


def _insertion_cost(rates_descending: Sequence[float], steps: Sequence[float], at: int,
                    rate: float) -> float:
    """What _busy grows by when `rate` is inserted at index `at`: its own term, plus one batch
    size more for every rate after it. O(len - at): selections insert near the end."""
    cost = rate * (steps[at + 1] - steps[at])
    for i in range(at, len(rates_descending)):
        cost += rates_descending[i] * (steps[i + 2] - 2 * steps[i + 1] + steps[i])
    return cost


@functools.lru_cache(maxsize=4096)  # re-planned on every arrival: the same rows recur
def mask_columns(tokens_per_cycle: int, num_columns: int) -> frozenset[int]:
    """k ones spread evenly over the columns of one cycle."""
    return frozenset(i * num_columns // tokens_per_cycle for i in range(tokens_per_cycle))


@register("slice")
class SlicePolicy(Policy):
    steady_decode = False  # the mask decodes different rows each step
    cli_options = {
        "slice-period-ms": ("period_ms", float, "length of one decode cycle"),
        "slice-ratio": ("ratio", float, "share of each cycle for decoding (the rest: prefills)"),
        "realtime-utility": ("realtime_utility", float, "utility of a real-time task "
                                                        "(others: 1)"),
    }
    def __init__(self, realtime_utility: float = 10.0, utility: float = 1.0,
                 period_ms: float = 1000.0, ratio: float = 0.9,
                 best_effort_tpot_ms: float = 250.0,
                 latency: LatencyModel | str | None = None, work_conserving: bool = True):
        if not 0 < ratio <= 1 or period_ms <= 0 or best_effort_tpot_ms <= 0:
            raise ValueError("slice needs 0 < ratio <= 1, period_ms > 0, best_effort_tpot_ms > 0")
        if realtime_utility <= 0 or utility <= 0:
            raise ValueError("utilities must be positive")
        self.realtime_utility, self.utility = realtime_utility, utility
        self.period_s, self.ratio = period_ms / 1e3, ratio
        self.best_effort_tpot_ms = best_effort_tpot_ms
        self.work_conserving = work_conserving  # spare room in a step goes to unmarked tasks
        if latency is None:
            latency = LatencyModel.default()
        elif isinstance(latency, str):
            latency = LatencyModel.from_file(latency)
        self.latency = latency
        self.speed = 1.0  # measured / predicted step time, learnt online (EWMA)
        self._profile_steps: list[float] = []  # latency.decode_time(b) at index b
        self._version = -1  # the scheduler's version the selection was made for
        self.selected: list[Request] = []  # by utility rate, highest first
        self.rows: dict[str, frozenset[int]] = {}  # the mask: request id -> its columns
        self.num_columns = 1
        self.column = 0
        self._prefill_room = 1 << 30  # prefill tokens left in this step

    def decode_time(self, batch: int) -> float:
        """l(b) from the profile, corrected by how fast steps have really been running."""
        return self.latency.decode_time(batch) * self.speed

    def observe(self, plan: Plan, step_time: float) -> None:
        predicted = self.latency.step_time(plan)
        if predicted > 0:
            self.speed += 0.1 * (step_time / predicted - self.speed)

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

    def select(self, candidates: Sequence[Request], limit: int = 256) -> list[Request]:
        """Greedy by utility rate, at most `limit` tasks; after MAX_MISSES candidates in a
        row do not fit, the rest (lower utility rates) are not tried."""
        ordered = sorted(candidates, key=lambda r: (-self.utility_rate(r), not r.slo.realtime,
                                                    r.arrival_time))
        steps = self._steps(min(len(ordered), limit) + 1)
        chosen: list[Request] = []
        rates: list[float] = []  # descending
        busy, misses = 0.0, 0
        for request in ordered:
            if len(chosen) == limit or misses == MAX_MISSES:
                break
            rate = self.rate(request)
            at = bisect.bisect_right(rates, -rate, key=lambda v: -v)  # after equal rates
            trial = busy + _insertion_cost(rates, steps, at, rate)
            if trial <= self.ratio or not chosen:
                chosen.append(request)
                rates.insert(at, rate)
                busy, misses = trial, 0
            else:
                misses += 1
        return chosen

    def _steps(self, n: int) -> list[float]:
        """decode_time(b) for b < n (the profile's part cached; the speed factor moves)."""
        while len(self._profile_steps) < n:
            self._profile_steps.append(self.latency.decode_time(len(self._profile_steps)))
        return [t * self.speed for t in self._profile_steps[:n]]

    # ---- stage 2: the token mask -------------------------------------------------------
    def build_mask(self, selected: Sequence[Request]) -> None:
        per_cycle = {r.request_id: max(1, math.ceil(self.rate(r) * self.period_s))
                     for r in selected}
        self.num_columns = max(per_cycle.values(), default=1)
        self.rows = {rid: mask_columns(k, self.num_columns) for rid, k in per_cycle.items()}
        self.column = 0

    def prepare(self, scheduler: SchedulerView, now: float) -> None:
        if scheduler.version != self._version:  # a task arrived or finished: re-plan
            self._version = scheduler.version
            unfinished = [*scheduler.running, *scheduler.preempted, *scheduler.waiting]
            self.selected = self.select(unfinished, scheduler.config.max_num_seqs)
            self.build_mask(self.selected)
        else:
            self.column = (self.column + 1) % self.num_columns

    # ---- the mechanism's questions -----------------------------------------------------
    def running_order(self, running: Sequence[Request], now: float) -> Iterable[Request]:
        """Selected tasks marked in this column, plus selected prefills still in progress;
        then, while the step still ends within the tightest TPOT of those (work-conserving
        fill), unmarked selected tasks. Everything else pauses this step, keeping its KV."""
        live = {r.request_id for r in running}
        marked, unmarked = [], []
        for r in self.selected:
            if r.request_id in live:
                on = r.num_pending_tokens > 1 or self.column in self.rows.get(r.request_id, ())
                (marked if on else unmarked).append(r)
        decodes = [r for r in marked if r.num_pending_tokens == 1]
        # The step may last until the first of these tasks' next tokens falls due at its TPOT
        # pace: tasks ahead of pace lend their slack to prefills and to unmarked tasks.
        limit = min((next_deadline(r) for r in decodes), default=float("inf")) - now
        fill = []
        for r in unmarked if self.work_conserving else ():
            if self.decode_time(len(decodes) + len(fill) + 1) > limit:
                break
            fill.append(r)
        self._prefill_room = self._room_for_prefill(len(decodes) + len(fill), limit)
        return marked + fill

    def _room_for_prefill(self, num_decodes: int, limit: float) -> int:
        """Prefill tokens this step may carry so that it still ends within `limit` seconds:
        a prompt never makes a decoding task miss its pace. A prompt token added to a decode
        step costs about what one more decode row costs."""
        if limit == float("inf"):
            return 1 << 30
        lo, hi = 0, 1 << 13  # in 8-token steps: the first step that no longer fits
        while lo < hi:  # step times grow with the batch: bisect
            mid = (lo + hi) // 2
            if self.decode_time(num_decodes + 8 * mid + 8) <= limit:
                lo = mid + 1
            else:
                hi = mid
        return 8 * lo

    def admission_order(self, preempted: Sequence[Request], waiting: Sequence[Request],
                        now: float) -> Iterable[Request]:
        queued = {r.request_id for r in preempted} | {r.request_id for r in waiting}
        chosen = [r for r in self.selected if r.request_id in queued]
        return sorted(chosen, key=lambda r: not r.slo.realtime)  # stable: real-time first

    def chunk_size(self, request: Request, num_pending: int, budget: int, step_budget: int) -> int:
        if num_pending == 1:
            return 1
        size = min(num_pending, budget, self._prefill_room)
        self._prefill_room -= size
        return size

    def pick_victim(self, candidates: Sequence[Request], now: float) -> Request:
        chosen = {r.request_id for r in self.selected}
        return min(candidates, key=lambda r: (r.request_id in chosen, self.utility_rate(r),
                                              -r.arrival_time))
