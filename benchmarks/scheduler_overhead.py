"""CPU time of Scheduler.schedule() + update() per step, per policy, no model: 256 running
requests of the edge mix's SLO classes, 2,000 more waiting, and a new arrival every step (so
policies that re-plan on arrivals do so every step).

Target: under 1 ms per step for every policy.

    python benchmarks/scheduler_overhead.py [--policies fcfs,edf] [--num-waiting 2000]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve.core.kv_blocks import BlockManager  # noqa: E402
from sloserve.core.latency import PROFILES  # noqa: E402
from sloserve.core.policies import policy_names, prices_steps  # noqa: E402
from sloserve.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from sloserve.request import SLO, Request, SamplingParams  # noqa: E402
from sloserve.workload import spec as workload  # noqa: E402

# the edge mix's classes, TTFTs stretched so that nobody waiting expires during the run
H200 = PROFILES / "gpu-h200-llama-3-8b.json"
CLASSES = [SLO(**{**vars(c.slo), "ttft_ms": 1e9}) for c in workload.load("edge").classes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-running", type=int, default=256)
    parser.add_argument("--num-waiting", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--policies", default=",".join(policy_names()))
    args = parser.parse_args()
    results = {}
    for policy in args.policies.split(","):
        results[policy] = round(measure(policy, args), 3)
        print(f"{policy:8s} schedule()+update(), {args.num_running} running + "
              f"{args.num_waiting} waiting, an arrival each step: {results[policy]:.3f} ms CPU "
              f"per step (target < 1 ms)", flush=True)
    save("scheduler_overhead", {**vars(args), "ms_per_step": results})


def measure(policy: str, args) -> float:
    options = {"latency": str(H200)} if prices_steps(policy) else {}  # 256 fit its cycle
    config = SchedulerConfig(max_num_seqs=args.num_running, max_num_batched_tokens=65536,
                             policy=policy, policy_options=options)
    scheduler = Scheduler(config, BlockManager(num_blocks=40000, block_size=16))
    params = SamplingParams(max_tokens=10**6, ignore_eos=True)
    ids = itertools.count()

    def arrive(now: float) -> None:
        i = next(ids)
        scheduler.add(Request(f"r{i}", list(range(100 + i % 200)), params,
                              CLASSES[i % len(CLASSES)], arrival_time=now))

    for _ in range(args.num_running):
        arrive(0.0)
    for _ in range(100):  # prefill steps admit the first ones
        step(scheduler, 0.0)
    assert len(scheduler.running) == args.num_running
    for _ in range(args.num_waiting):
        arrive(0.0)
    start = time.process_time()
    for i in range(args.steps):
        now = 1.0 + i * 0.01
        arrive(now)
        step(scheduler, now)
    return (time.process_time() - start) / args.steps * 1e3


def step(scheduler: Scheduler, now: float) -> None:
    plan = scheduler.schedule(now)
    scheduler.update(plan, {c.request.request_id: 5 for c in plan.chunks if c.sample}, now)


if __name__ == "__main__":
    main()
