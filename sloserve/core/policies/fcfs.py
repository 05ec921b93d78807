"""First come, first served: the vLLM-like baseline."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sloserve.core.policies.base import Policy, register
from sloserve.request import Request


@register("fcfs")
class FCFSPolicy(Policy):
    """Admit in arrival order (priority breaks ties) while blocks and budget allow; on block
    exhaustion preempt the newest running request and resume it before new admissions."""

    def admission_order(
        self, preempted: Sequence[Request], waiting: Sequence[Request], now: float
    ) -> Iterable[Request]:
        yield from preempted
        if any(r.priority for r in waiting):
            waiting = sorted(waiting, key=lambda r: (r.arrival_time, r.priority))
        yield from waiting
