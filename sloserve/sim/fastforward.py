"""Fast-forward through runs of identical decode steps.

With nothing waiting and a policy whose decode steps do not depend on the clock, every step
until the next arrival, the next finish or the next KV shortage decodes the same requests. The
scheduler would make the same Plan each time; this advances all of them at once and charges
the latency model step by step. A test holds fast-forwarded runs equal to step-by-step ones.
"""

from __future__ import annotations

from sloserve.core.scheduler import Scheduler

MIN_RUN = 4  # below this, stepping normally is as cheap


def steady_steps(scheduler: Scheduler) -> int:
    """How many decode steps may be skipped over before something could change (0: none)."""
    running = scheduler.running
    if (scheduler.waiting or scheduler.preempted or scheduler.arrived or not running
            or not scheduler.policy.steady_decode
            or len(running) > scheduler.config.max_num_batched_tokens):
        return 0
    limit = scheduler.config.max_model_len
    steps = 1 << 30
    for r in running:
        if r.num_pending_tokens != 1:
            return 0  # a prefill is still in progress
        left = r.sampling_params.max_tokens - r.num_output_tokens
        if limit is not None:
            left = min(left, limit - r.num_tokens)
        steps = min(steps, left - 1)  # the finishing step goes through the scheduler
    return steps if steps >= MIN_RUN else 0


def _blocks_needed(scheduler: Scheduler, steps: int) -> int:
    blocks = scheduler.blocks
    return sum(max(0, blocks.blocks_for(r.num_computed_tokens + steps) - len(r.block_ids))
               for r in scheduler.running)


def _steps_within_pool(scheduler: Scheduler, steps: int) -> int:
    """The most steps (<= steps) whose new KV blocks the free pool still holds."""
    free = scheduler.blocks.num_free_blocks
    lo, hi = 0, steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _blocks_needed(scheduler, mid) <= free else (lo, mid - 1)
    return lo


def fast_forward(scheduler: Scheduler, latency, clock: float, until: float, steps: int,
                 token: int) -> float:
    """Run up to `steps` decode steps that start before `until`; returns the new clock
    (unchanged when too few steps fit to be worth it)."""
    running = scheduler.running
    steps = _steps_within_pool(scheduler, steps)
    if steps < MIN_RUN:
        return clock
    batch = len(running)
    context = sum(r.num_tokens for r in running)  # each decode attends to all its tokens
    done = 0
    while done < steps and clock < until:
        clock += latency.decode_step_time(batch, context + done * batch)
        done += 1
    for r in running:
        scheduler.blocks.append(r, done)
        r.num_computed_tokens += done
        r.output_token_ids.extend([token] * done)
        r.last_token_time = clock
    return clock
