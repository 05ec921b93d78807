"""Scheduling policies head to head: the engine on this CPU with SmolLM2 under the edge mix.

Each policy serves the same requests (same prompts, SLO classes and Poisson arrival times) in
the same run; prints SLO attainment per class and overall, and goodput, per policy.
Target: slice's real-time attainment >= 95% where fcfs's is below 60%, with overall goodput no
worse than fcfs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve.bench.local import run_engine  # noqa: E402
from sloserve.config import EngineConfig, SchedulerConfig  # noqa: E402
from sloserve.engine import LLMEngine  # noqa: E402
from sloserve.workload import spec as workload  # noqa: E402
from sloserve.workload.metrics import summarize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policies", default="fcfs,delay,chunked,edf,slice")
    parser.add_argument("--num-requests", type=int, default=60)
    parser.add_argument("--request-rate", type=float, default=8.0)
    parser.add_argument("--realtime-share", type=float, default=0.3)
    parser.add_argument("--slo-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = workload.load("edge").scaled(args.slo_scale)  # edge SLOs assume faster hardware
    rest = (1 - args.realtime_share) / (len(spec.classes) - 1)
    spec = dataclasses.replace(spec, classes=tuple(
        dataclasses.replace(c, share=args.realtime_share if c.slo.realtime else rest)
        for c in spec.classes))
    requests = workload.build(spec, args.num_requests, args.seed, rate=args.request_rate)
    results = {}
    for policy in args.policies.split(","):
        engine = LLMEngine(EngineConfig(scheduler=SchedulerConfig(
            policy=policy, max_num_batched_tokens=256 if policy == "chunked" else 2048)))
        records, duration = run_engine(engine, [dataclasses.replace(r) for r in requests])
        results[policy] = summarize(records, duration)
        print_row(policy, results[policy], [c.name for c in spec.classes])
    save("policy_compare", {"workload": "edge x slo-scale", "args": vars(args),
                            "classes": [dataclasses.asdict(c) for c in spec.classes],
                            "results": results})


def print_row(policy: str, s: dict, classes: list[str]) -> None:
    per_class = "  ".join(f"{c} {s['per_class'][c]['slo_attainment']:6.1%}"
                          for c in classes if c in s["per_class"])
    print(f"{policy:8s} overall {s['slo_attainment']:6.1%}  {per_class}  "
          f"goodput {s['goodput']:.3f} req/s  p90 TPOT {s['tpot_ms']['p90']:.0f} ms  "
          f"p90 TTFT {s['ttft_ms']['p90']:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
