"""Simulator speed: 100,000 requests of the Mooncake conversation trace through one instance.

One simulated H200 serving Llama-3-8B (analytic roofline), chunked prefill (8,192-token
steps), the trace's own arrivals (repeated in laps to reach the count) stretched so that one
instance keeps up. Prints the
wall time; target: under 60 s on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve.config import SchedulerConfig  # noqa: E402
from sloserve.sim.run import Deployment, simulate  # noqa: E402
from sloserve.workload import spec as workload  # noqa: E402
from sloserve.workload.metrics import summarize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=100_000)
    parser.add_argument("--time-scale", type=float, default=4.0)
    parser.add_argument("--policy", default="chunked")
    args = parser.parse_args()
    start = time.perf_counter()
    requests = workload.build(workload.load("mooncake"), args.num_requests, with_text=False,
                              time_scale=args.time_scale)
    built = time.perf_counter() - start
    deployment = Deployment(gpu="h200", model_shape="llama-3-8b", scheduler=SchedulerConfig(
        max_num_batched_tokens=8192, max_model_len=131072, policy=args.policy))
    records, duration = simulate(deployment, requests)
    wall = time.perf_counter() - start
    s = summarize(records, duration)
    print(f"{len(records)} requests, {duration:.0f} s simulated, in {wall:.1f} s wall "
          f"({built:.1f} s building the workload); target < 60 s")
    print(f"completed {s['completed']}, attainment {s['slo_attainment']:.1%}, "
          f"p90 TTFT {s['ttft_ms']['p90']:.0f} ms, p90 TPOT {s['tpot_ms']['p90']:.0f} ms")
    save("sim_speed", {"num_requests": len(records), "simulated_s": round(duration, 1),
                       "wall_s": round(wall, 2), "completed": s["completed"],
                       "deployment": f"1x H200 roofline, Llama-3-8B shape, {args.policy}",
                       "time_scale": args.time_scale})


if __name__ == "__main__":
    main()
