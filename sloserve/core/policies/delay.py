"""Delay factor: hold new prompts briefly so prefills batch up instead of interrupting the
running decodes one by one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sloserve.core.plan import Plan
from sloserve.core.policies.base import Policy, SchedulerView, register
from sloserve.request import Request


@register("delay")
class DelayPolicy(Policy):
    """New arrivals wait until the oldest has waited `delay_factor` x the latency of the last
    step that ran a prompt (or nothing is running). Preempted requests have their own queue,
    resumed first and in preemption order, never delayed.

    Against the llm-serving formula (vLLM v0's `Scheduler._passed_delay`):
    - the same: the wait is that of the earliest arrival among the waiting; anything is
      admitted whenever nothing runs; preempted work is not held back;
    - the latency is the measured duration of the last step that carried prompt tokens;
      vLLM takes the time from that step's scheduling to the next scheduling call, which also
      counts the host's gap between steps (a little longer, so it holds a little longer);
    - `>=` where vLLM has `>`: with delay_factor 0 both admit at once (vLLM special-cases 0),
      and on a virtual clock, where a wait can equal the threshold exactly, `>=` admits."""

    steady_decode = True
    cli_options = {"delay-factor": ("delay_factor", float, "x the last prompt step's latency")}

    def __init__(self, delay_factor: float = 0.5):
        if delay_factor < 0:
            raise ValueError(f"delay_factor must be >= 0, got {delay_factor}")
        self.delay_factor = delay_factor
        self.last_prompt_latency = 0.0
        self._nothing_running = True

    def prepare(self, scheduler: SchedulerView, now: float) -> None:
        self._nothing_running = not scheduler.running

    def admission_order(self, preempted: Sequence[Request], waiting: Sequence[Request],
                        now: float) -> Iterable[Request]:
        yield from preempted
        if waiting and self._delay_over(waiting, now):
            yield from waiting

    def _delay_over(self, waiting: Sequence[Request], now: float) -> bool:
        if self._nothing_running:
            return True
        oldest = min(r.arrival_time for r in waiting)
        return now - oldest >= self.delay_factor * self.last_prompt_latency

    def observe(self, plan: Plan, step_time: float) -> None:
        if plan.num_prefill_tokens:
            self.last_prompt_latency = step_time
