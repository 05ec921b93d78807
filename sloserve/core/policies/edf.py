"""Earliest deadline first: serve whoever is closest to missing its next objective."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence

from sloserve.core.latency import LatencyModel
from sloserve.core.plan import Plan
from sloserve.core.policies.admission import AdmissionControl
from sloserve.core.policies.base import Policy, SchedulerView, register
from sloserve.core.policies.pacing import CalibratedSteps
from sloserve.request import Request, RequestStatus

QUEUED = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


def next_deadline(request: Request) -> float:
    """When the request's next objective falls due: its TTFT before the first token, then
    its TPOT pace (the k-th token after the first is due k x TPOT after the first), capped by
    an end-to-end deadline. No objectives, or demoted to best effort: never."""
    slo = request.slo
    due = math.inf
    if request.best_effort:
        return due
    if request.first_token_time is None:
        if slo.ttft_ms is not None:
            due = request.arrival_time + slo.ttft_ms / 1e3
    elif slo.tpot_ms is not None:
        due = request.first_token_time + request.num_output_tokens * slo.tpot_ms / 1e3
    if slo.deadline_ms is not None:
        due = min(due, request.arrival_time + slo.deadline_ms / 1e3)
    return due


class DeadlineQueue:
    """Queued requests by (deadline, arrival), kept sorted as they arrive or are preempted
    (a queued request's deadline does not move), so a step reads the front instead of
    sorting thousands. Entries of requests no longer queued are skipped and dropped lazily."""

    def __init__(self) -> None:
        self._entries: list[tuple[float, float, int, Request]] = []
        self._current: dict[str, int] = {}  # request id -> sequence number of its live entry
        self._seq = itertools.count()

    def push(self, request: Request) -> None:
        seq = next(self._seq)
        self._current[request.request_id] = seq
        bisect.insort(self._entries, (next_deadline(request), request.arrival_time, seq, request))

    def discard(self, request: Request) -> None:
        self._current.pop(request.request_id, None)

    def _live(self, entry: tuple[float, float, int, Request]) -> bool:
        request = entry[3]
        return self._current.get(request.request_id) == entry[2] and request.status in QUEUED

    def __iter__(self) -> Iterator[Request]:
        entries = self._entries
        dead = 0
        while dead < len(entries) and not self._live(entries[dead]):
            dead += 1
        del entries[:dead]  # mostly admitted ones: they leave from the front
        if len(entries) > 2 * len(self._current) + 64:  # many dead in the middle: compact
            entries[:] = [e for e in entries if self._live(e)]
        return (e[3] for e in entries if self._live(e))


@register("edf")
class EarliestDeadlinePolicy(Policy):
    """Order running work, admissions and preemption victims by next deadline (the same
    order as least slack, slack = deadline - now); requests with no objective come last, in
    arrival order; the victim is the one whose deadline is furthest; prompts are chunked into
    the budget left. With admission control
    (the default), a request that cannot meet its TTFT is rejected at once (admission.py)."""

    steady_decode = True

    def __init__(self, latency: LatencyModel | str | None = None,
                 admission_control: bool = True, margin_quantile: float = 0.9):
        self.steps = CalibratedSteps(latency, margin_quantile)
        self.admission = AdmissionControl(
            lambda r: 0.0 if r.best_effort else 1.0, self.steps.prefill_time,
            lambda: self.steps.decode_time(1),
            lambda: self.steps.margin.value) if admission_control else None
        self.queue = DeadlineQueue()

    @staticmethod
    def _key(request: Request) -> tuple[float, float]:
        return next_deadline(request), request.arrival_time

    def on_arrival(self, request: Request) -> None:
        self.queue.push(request)

    def on_requeued(self, request: Request) -> None:
        self.queue.push(request)

    def on_finished(self, request: Request) -> None:
        self.queue.discard(request)

    def rejection(self, scheduler: SchedulerView, request: Request, now: float) -> str | None:
        return None if self.admission is None else self.admission.rejection(request, now)

    def expired(self, scheduler: SchedulerView, now: float) -> Iterable[tuple[Request, str]]:
        return () if self.admission is None else self.admission.expired(now)

    def prepare(self, scheduler: SchedulerView, now: float) -> None:
        if self.admission is not None:
            self.admission.note(now)

    def observe(self, plan: Plan, step_time: float) -> None:
        self.steps.observe(plan, step_time)

    def state(self) -> str:
        return self.steps.state()

    def running_order(self, running: Sequence[Request], now: float) -> Iterable[Request]:
        return sorted(running, key=self._key)

    def admission_order(self, preempted: Sequence[Request], waiting: Sequence[Request],
                        now: float) -> Iterable[Request]:
        return iter(self.queue)

    def import_order(self, arrived: Sequence[Request], now: float) -> Iterable[Request]:
        return sorted(arrived, key=self._key)

    def chunk_size(self, request: Request, num_pending: int, budget: int, step_budget: int) -> int:
        """Prompts are chunked into whatever budget is left, so a long one never waits for
        a whole empty step behind the decodes (head-of-line blocking)."""
        return min(num_pending, budget)

    def pick_victim(self, candidates: Sequence[Request], now: float) -> Request:
        return max(candidates, key=self._key)
