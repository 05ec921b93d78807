"""The policy protocol: the mechanism asks, the policy decides.

The scheduler mechanism owns queues, the token budget and KV blocks. A policy decides who runs
and in what order, when to admit, how big a prefill chunk is and whom to preempt. Subclass
`Policy`, override what differs, and register it by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Protocol

from sloserve.config import SchedulerConfig
from sloserve.core.plan import Plan
from sloserve.request import Request

_REGISTRY: dict[str, type[Policy]] = {}


class SchedulerView(Protocol):
    """What a policy may read of the scheduler that asks it (core/scheduler.py)."""

    config: SchedulerConfig
    waiting: Sequence[Request]
    preempted: Sequence[Request]  # in preemption order
    running: Sequence[Request]
    version: int  # bumped whenever a request arrives or finishes


def register(name: str) -> Callable[[type[Policy]], type[Policy]]:
    def wrap(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(policy_names())}")
    return _REGISTRY[name]


def prices_steps(name: str) -> bool:
    """Whether the policy takes a step-latency model (`latency`): it should get the one of
    the hardware it schedules for."""
    return "latency" in inspect.signature(policy_class(name)).parameters


def make_policy(name: str, **options: Any) -> Policy:
    """ValueError for an unknown name, option or option value."""
    try:
        return policy_class(name)(**options)
    except TypeError as e:  # an option the policy does not take
        raise ValueError(f"policy {name}: {e}") from None


class Policy:
    """Defaults give first-come-first-served with vLLM's recompute preemption.

    `cli_options` maps a command-line flag (without the dashes) to the constructor argument
    it sets; every command that takes --policy offers those flags."""

    name: ClassVar[str] = "base"
    # True when, with nothing waiting, every running request decodes every step whatever the
    # clock says: the simulator may then fast-forward runs of identical decode steps. Off
    # unless a policy declares it, so a new policy is never fast-forwarded wrongly.
    steady_decode: ClassVar[bool] = False
    cli_options: ClassVar[dict[str, tuple[str, type, str]]] = {}  # flag -> (arg, type, help)

    # ---- bookkeeping: policies that keep their own indexes of the queues ------------------
    def on_arrival(self, request: Request) -> None:
        """A request joined the scheduler (waiting, or expecting remote KV)."""

    def on_requeued(self, request: Request) -> None:
        """A running request was preempted back into the queue."""

    def on_finished(self, request: Request) -> None:
        """A request left the scheduler (finished, aborted or rejected)."""

    # ---- admission control ---------------------------------------------------------------
    def rejection(self, scheduler: SchedulerView, request: Request, now: float) -> str | None:
        """Why a request that just arrived cannot meet its objective (it is then rejected or
        demoted to best effort, as its SLO says); None admits it to the queue."""
        return None

    def expired(self, scheduler: SchedulerView, now: float) -> Iterable[tuple[Request, str]]:
        """Queued requests whose objective went out of reach while they waited, each with
        the reason; the scheduler rejects or demotes them."""
        return ()

    def state(self) -> str:
        """What the policy has learned, for the engine's stats line ("" if nothing)."""
        return ""

    # ---- each step -------------------------------------------------------------------------
    def prepare(self, scheduler: SchedulerView, now: float) -> None:
        """Called at the start of every schedule(), for policies that plan per step."""

    def running_order(self, running: Sequence[Request], now: float) -> Iterable[Request]:
        """Running requests to step now, most important first; leaving one out skips it."""
        return running

    def should_admit(self, scheduler: SchedulerView, now: float) -> bool:
        """Whether to admit waiting or preempted requests in this step at all."""
        return True

    def admission_order(
        self, preempted: Sequence[Request], waiting: Sequence[Request], now: float
    ) -> Iterable[Request]:
        """Candidates for admission, in order; admission stops at the first that won't fit."""
        yield from preempted
        yield from waiting

    def import_order(self, arrived: Sequence[Request], now: float) -> Iterable[Request]:
        """Requests prefilled elsewhere whose KV has arrived, in the order to take them in
        (each must come out exactly once)."""
        return arrived

    def chunk_size(self, request: Request, num_pending: int, budget: int, step_budget: int) -> int:
        """Tokens of `request` to compute this step (0 skips it), with `budget` tokens left of
        the step's `step_budget`. Default: a prompt runs whole when it fits; only one larger
        than a whole step is split, so it can run at all."""
        if num_pending <= budget:
            return num_pending
        return budget if budget == step_budget else 0

    def pick_victim(self, candidates: Sequence[Request], now: float) -> Request:
        """Whom to preempt when KV blocks run out: the latest arrival."""
        return max(candidates, key=lambda r: (r.arrival_time, r.priority))

    def observe(self, plan: Plan, step_time: float) -> None:
        """Feedback after each step (how long it took), for policies that adapt."""
