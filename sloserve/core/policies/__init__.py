"""Scheduling policies, one per file, picked by name."""

from sloserve.core.policies import chunked, delay, edf, fcfs, slice  # noqa: F401  (registers)
from sloserve.core.policies.base import Policy, make_policy, policy_names, register

__all__ = ["Policy", "make_policy", "policy_names", "register"]
