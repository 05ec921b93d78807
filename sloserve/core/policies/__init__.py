"""Scheduling policies, one per file, picked by name."""

from sloserve.core.policies import chunked, delay, edf, fcfs, slice  # noqa: F401  (registers)
from sloserve.core.policies.base import (
    Policy,
    SchedulerView,
    make_policy,
    policy_class,
    policy_names,
    prices_steps,
    register,
)

__all__ = ["Policy", "SchedulerView", "make_policy", "policy_class", "policy_names",
           "prices_steps", "register"]
