"""Scheduler and request factories for model-free tests (fake clock, fixed tokens)."""

from __future__ import annotations

from sloserve.config import SchedulerConfig
from sloserve.core.kv_blocks import BlockManager
from sloserve.core.scheduler import Scheduler
from sloserve.request import SLO, Request, SamplingParams

EOS = 0


def make_scheduler(num_blocks: int = 64, block_size: int = 4, policy: str = "fcfs",
                   prefix_caching: bool = True, **config) -> Scheduler:
    blocks = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(SchedulerConfig(policy=policy, **config), blocks)


def make_request(request_id: str, prompt_len: int, max_tokens: int = 4, arrival: float = 0.0,
                 first_token: int = 1, slo: SLO | None = None, priority: int = 0) -> Request:
    prompt = [first_token + i for i in range(prompt_len)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   slo=slo or SLO(), arrival_time=arrival, priority=priority, eos_token_id=EOS)


def run_step(scheduler: Scheduler, now: float, token: int = 7):
    """One scheduling step with a model that always samples `token`."""
    plan = scheduler.schedule(now)
    sampled = {c.request.request_id: token for c in plan.chunks if c.sample}
    scheduler.update(plan, sampled, now)
    return plan
