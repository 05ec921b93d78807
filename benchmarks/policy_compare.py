"""Scheduling policies head to head: the engine on this CPU with SmolLM2 under the edge mix.

Each policy serves the same requests (same prompts, SLO classes and Poisson arrival times),
repeated `--repeats` times with the policies interleaved, so drift of this shared machine
falls on all of them alike; prints SLO attainment per class and overall, and goodput, per
run, then min / median / max per policy and whether the ranking by attainment was the same
in every repeat. Sustained by default: 60 s of arrivals.

    python benchmarks/policy_compare.py [--repeats 3] [--duration 60] [--request-rate 5]
        [--quantization int4]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
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
    parser.add_argument("--policies", default="fcfs,chunked,edf,slice")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--request-rate", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--realtime-share", type=float, default=0.3)
    parser.add_argument("--slo-scale", type=float, default=2.0)
    parser.add_argument("--quantization", default="int4",
                        help="int4 (default: how an edge box serves it) or none (float32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = workload.load("edge").scaled(args.slo_scale)  # edge SLOs assume faster hardware
    rest = (1 - args.realtime_share) / (len(spec.classes) - 1)
    spec = dataclasses.replace(spec, classes=tuple(
        dataclasses.replace(c, share=args.realtime_share if c.slo.realtime else rest)
        for c in spec.classes))
    num_requests = int(args.duration * args.request_rate)
    requests = workload.build(spec, num_requests, args.seed, rate=args.request_rate)
    policies = args.policies.split(",")
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    for repeat in range(args.repeats):
        for policy in policies:
            engine = LLMEngine(EngineConfig(quantization=args.quantization,
                                            log_stats_interval_s=0, scheduler=SchedulerConfig(
                policy=policy, max_num_batched_tokens=256 if policy == "chunked" else 2048)))
            records, duration = run_engine(engine, [dataclasses.replace(r) for r in requests])
            engine.shutdown()
            runs[policy].append(summarize(records, duration))
            print_row(f"{policy} #{repeat + 1}", runs[policy][-1], [c.name for c in spec.classes])
    rankings = [sorted(policies, key=lambda p: -runs[p][i]["slo_attainment"])
                for i in range(args.repeats)]
    spread = {p: {key: min_median_max([read(s) for s in runs[p]]) for key, read in (
        ("slo_attainment", lambda s: s["slo_attainment"]),
        ("realtime_attainment", lambda s: s["per_class"]["realtime"]["slo_attainment"]),
        ("goodput", lambda s: s["goodput"]))} for p in policies}
    for p in policies:
        print(f"{p:8s} " + "  ".join(f"{k} {v['min']:.3f}/{v['median']:.3f}/{v['max']:.3f}"
                                     for k, v in spread[p].items()))
    same = all(r == rankings[0] for r in rankings)
    print(f"ranking by attainment in each repeat: {rankings} (same every time: {same})")
    save("policy_compare", {"workload": "edge x slo-scale", "args": vars(args),
                            "num_requests": num_requests,
                            "classes": [dataclasses.asdict(c) for c in spec.classes],
                            "min_median_max": spread, "rankings": rankings,
                            "same_ranking_every_repeat": same, "runs": runs})


def min_median_max(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def print_row(policy: str, s: dict, classes: list[str]) -> None:
    per_class = "  ".join(f"{c} {s['per_class'][c]['slo_attainment']:6.1%}"
                          for c in classes if c in s["per_class"])
    print(f"{policy:8s} overall {s['slo_attainment']:6.1%}  {per_class}  "
          f"goodput {s['goodput']:.3f} req/s  p90 TPOT {s['tpot_ms']['p90']:.0f} ms  "
          f"p90 TTFT {s['ttft_ms']['p90']:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
