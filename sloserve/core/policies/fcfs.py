"""First come, first served: the vLLM-like baseline."""

from __future__ import annotations

from sloserve.core.policies.base import Policy, register


@register("fcfs")
class FCFSPolicy(Policy):
    """Admit in arrival order (the waiting queue is kept in (arrival, priority) order, so
    priority breaks ties) while blocks and budget allow; on block exhaustion preempt the
    newest running request and resume it before new admissions. All of it is the base
    policy's default behaviour."""

    steady_decode = True
