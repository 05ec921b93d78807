"""Earliest deadline first: serve whoever is closest to missing its next objective."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from sloserve.core.policies.base import Policy, register
from sloserve.request import Request


def next_deadline(request: Request) -> float:
    """When the request's next objective falls due: its TTFT before the first token, then
    its TPOT pace (the k-th token after the first is due k x TPOT after the first), capped by
    an end-to-end deadline. No objectives: never."""
    slo = request.slo
    due = math.inf
    if request.first_token_time is None:
        if slo.ttft_ms is not None:
            due = request.arrival_time + slo.ttft_ms / 1e3
    elif slo.tpot_ms is not None:
        due = request.first_token_time + request.num_output_tokens * slo.tpot_ms / 1e3
    if slo.deadline_ms is not None:
        due = min(due, request.arrival_time + slo.deadline_ms / 1e3)
    return due


@register("edf")
class EarliestDeadlinePolicy(Policy):
    """Order running work, admissions and preemption victims by next deadline (the same
    order as least slack, slack = deadline - now); requests with no objective come last, in
    arrival order; the victim is the one whose deadline is furthest."""

    steady_decode = True

    @staticmethod
    def _key(request: Request) -> tuple[float, float]:
        return next_deadline(request), request.arrival_time

    def running_order(self, running: Sequence[Request], now: float) -> Iterable[Request]:
        return sorted(running, key=self._key)

    def admission_order(self, preempted: Sequence[Request], waiting: Sequence[Request],
                        now: float) -> Iterable[Request]:
        return sorted([*preempted, *waiting], key=self._key)

    def pick_victim(self, candidates: Sequence[Request], now: float) -> Request:
        return max(candidates, key=self._key)
