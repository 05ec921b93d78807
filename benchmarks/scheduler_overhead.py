"""CPU time of Scheduler.schedule() + update() per step with 256 running requests, no model.

Target: under 1 ms per step. The token budget admits all 256 as decodes every step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve.core.kv_blocks import BlockManager  # noqa: E402
from sloserve.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from sloserve.request import Request, SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--policy", default="fcfs")
    args = parser.parse_args()
    config = SchedulerConfig(max_num_seqs=args.num_requests, max_num_batched_tokens=65536,
                             policy=args.policy)
    scheduler = Scheduler(config, BlockManager(num_blocks=40000, block_size=16))
    params = SamplingParams(max_tokens=10**6, ignore_eos=True)
    for i in range(args.num_requests):
        scheduler.add(Request(f"r{i}", list(range(100 + i)), params, arrival_time=i * 1e-3))
    step(scheduler, 0.0)  # the prefill step admits everyone
    assert len(scheduler.running) == args.num_requests
    start = time.process_time()
    for i in range(args.steps):
        step(scheduler, 1.0 + i)
    per_step_ms = (time.process_time() - start) / args.steps * 1e3
    print(f"schedule()+update() with {args.num_requests} running: {per_step_ms:.3f} ms CPU "
          f"per step (target < 1 ms)")
    save(f"scheduler_overhead_{args.policy}", {
        "num_running": args.num_requests, "steps": args.steps, "policy": args.policy,
        "ms_per_step": round(per_step_ms, 3)})


def step(scheduler: Scheduler, now: float) -> None:
    plan = scheduler.schedule(now)
    scheduler.update(plan, {c.request.request_id: 5 for c in plan.chunks if c.sample}, now)


if __name__ == "__main__":
    main()
