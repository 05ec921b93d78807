"""SLO scheduling under sustained load, simulated: capacity at 90% attainment per policy,
goodput past capacity, real-time attainment. Every run has >= 60 s of Poisson arrivals and
>= 10,000 requests (a burst of a few seconds flatters every policy).

Machines: Llama-3-8B on one H100 and one H200 (the simulator's analytic roofline), the
engine's default limits (256 seats, 2,048 tokens a step) for every policy. Workloads: the
edge mix (30% real-time) and `longprompt` (the same classes over LongBench-like prompts).

For each machine and workload: each policy's capacity (highest rate at >= 90% attainment,
found by doubling then bisection; a run stops early once it cannot reach 90%; for the SLO
policies a rate counts only if no class attains less than under fcfs at that rate, within a
point); at the best SLO policy's capacity C, every class's attainment beside fcfs's; the
best policy's goodput at 1.5 C and 2 C over its own peak; its real-time attainment at every
measured rate where the real-time demand alone fits (0.3 x rate below the capacity of a
real-time-only load). Writes benchmarks/results/slo_sustained.json:

    python benchmarks/slo_sustained.py [--machines h100,h200] [--workloads edge,longprompt]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve.config import SchedulerConfig  # noqa: E402
from sloserve.sim.run import Deployment, simulate  # noqa: E402
from sloserve.workload import spec as workload  # noqa: E402
from sloserve.workload.metrics import summarize  # noqa: E402

BASELINES = ("fcfs", "chunked")  # vLLM v0-like (whole prompts) and v1-like (chunked prefill)
SLO_POLICIES = ("slice", "edf")
TARGET = 0.9
MIN_SECONDS, MIN_REQUESTS = 60.0, 10_000


def run(spec, gpu: str, policy: str, rate: float, seed: int, stop_early: bool = False) -> dict:
    n = max(MIN_REQUESTS, int(rate * MIN_SECONDS) + 1)
    requests = workload.build(spec, n, seed, with_text=False, rate=rate)
    d = Deployment(gpu=gpu, scheduler=SchedulerConfig(max_model_len=131072, policy=policy))
    max_misses = int((1 - TARGET) * n) if stop_early else None
    records, duration = simulate(d, requests, max_misses=max_misses)
    if len(records) < n:  # stopped early: the target was missed
        return {"rate": rate, "slo_attainment": 0.0, "stopped_early": True}
    s = summarize(records, duration)
    return {"rate": rate, "num_requests": n, "arrivals_s": requests[-1].arrival,
            "slo_attainment": s["slo_attainment"], "goodput": s["goodput"],
            "rejected": sum(r.error.startswith("rejected") for r in records),
            "per_class": {c: v["slo_attainment"] for c, v in s["per_class"].items()},
            "ttft_p90_ms": s["ttft_ms"]["p90"], "tpot_p90_ms": s["tpot_ms"]["p90"]}


def capacity(spec, gpu: str, policy: str, seed: int, start: float,
             baseline=None) -> tuple[float, list]:
    """Highest rate meeting the target: double from `start`, then bisect to ~3%. With a
    `baseline(rate)` run, a rate counts only if no class attains less than there (less a
    point of tolerance): capacity won by starving a class is not capacity."""
    tried = []

    def ok(rate: float) -> bool:
        result = run(spec, gpu, policy, rate, seed, stop_early=True)
        tried.append(result)
        starved = []
        if baseline is not None and result["slo_attainment"] >= TARGET:
            base = baseline(rate)["per_class"]
            starved = [c for c, a in result["per_class"].items() if a < base[c] - 0.01]
        note = f" starves {','.join(starved)}" if starved else ""
        print(f"  {gpu} {spec.name} {policy:8s} {rate:9.3f} req/s: "
              f"{result['slo_attainment']:.3f}{note}", flush=True)
        return result["slo_attainment"] >= TARGET and not starved

    lo, hi = 0.0, start
    while ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 0.03 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, tried


def realtime_only(spec):
    classes = [dataclasses.replace(c, share=1.0) for c in spec.classes if c.slo.realtime]
    return dataclasses.replace(spec, classes=tuple(classes))


def study(gpu: str, name: str, seed: int) -> dict:
    spec = workload.load(name)
    start = {"edge": 64.0, "longprompt": 1.0}[name]
    print(f"{name} on {gpu}:", flush=True)
    fcfs_runs: dict[float, dict] = {}

    def fcfs_at(rate: float) -> dict:
        if rate not in fcfs_runs:
            fcfs_runs[rate] = run(spec, gpu, "fcfs", rate, seed)
        return fcfs_runs[rate]

    caps, probes = {}, {}
    for p in (*BASELINES, *SLO_POLICIES):
        caps[p], probes[p] = capacity(spec, gpu, p, seed, start,
                                      fcfs_at if p in SLO_POLICIES else None)
    # what 90% alone would allow, before the no-starvation condition (a lower bound: the
    # highest probed rate that met it)
    plain = {p: max((r["rate"] for r in probes[p] if r["slo_attainment"] >= TARGET), default=0.0)
             for p in SLO_POLICIES}
    # The search resolves capacities to ~3%: within that of the top, the first listed wins
    # (slice, the seed's policy, which sheds by utility where edf sheds by deadline).
    top = max(caps[p] for p in SLO_POLICIES)
    best = next(p for p in SLO_POLICIES if caps[p] >= top * 0.97)
    c = caps[best]
    at = {m: run(spec, gpu, best, c * m, seed) for m in (1.0, 1.5, 2.0)}
    fcfs_at_c = fcfs_at(c)
    starved = [k for k, v in at[1.0]["per_class"].items() if v < fcfs_at_c["per_class"][k]]
    rt_cap, _ = capacity(realtime_only(spec), gpu, best, seed, start * 0.3)
    fits = [r for r in at.values() if 0.3 * r["rate"] <= rt_cap]
    peak = max(r["goodput"] for r in at.values())
    return {
        "capacity_req_s": caps, "best_slo_policy": best,
        "capacity_at_90pct_alone_req_s": plain,
        "probes": {p: [(r["rate"], r["slo_attainment"]) for r in tried]
                   for p, tried in probes.items()},
        "capacity_over_fcfs": c / caps["fcfs"] if caps["fcfs"] else None,
        "capacity_over_chunked": c / caps["chunked"] if caps["chunked"] else None,
        "best_at": {f"{m:g}x": r for m, r in at.items()}, "fcfs_at_capacity": fcfs_at_c,
        "classes_below_fcfs_at_capacity": starved,
        "goodput_at_1.5x_over_peak": at[1.5]["goodput"] / peak,
        "goodput_at_2x_over_peak": at[2.0]["goodput"] / peak,
        "realtime_only_capacity_req_s": rt_cap,
        "realtime_attainment_where_it_fits": {f"{r['rate']:.4g}": r["per_class"]["realtime"]
                                              for r in fits},
    }


def ratio(results: dict, workload_name: str, key: str) -> float | None:
    """The lowest over the machines: the bar must hold on each."""
    values = [v[key] for (m, w), v in results.items() if w == workload_name]
    return None if not values or None in values else round(min(values), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--machines", default="h100,h200")
    parser.add_argument("--workloads", default="edge,longprompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    began = time.time()
    cases = [(m, w, args.seed) for m in args.machines.split(",") for w in args.workloads.split(",")]
    with multiprocessing.Pool(min(len(cases), os.cpu_count() or 1)) as pool:
        results = dict(zip([c[:2] for c in cases], pool.starmap(study, cases)))
    rt = [a for v in results.values() for a in v["realtime_attainment_where_it_fits"].values()]
    body = {
        "simulated": "Llama-3-8B shape, bf16, analytic roofline; the engine's default limits",
        "elapsed_s": round(time.time() - began),
        "ratios": {
            "edge_capacity_over_fcfs": ratio(results, "edge", "capacity_over_fcfs"),
            "longprompt_capacity_over_fcfs": ratio(results, "longprompt", "capacity_over_fcfs"),
            "goodput_at_2x_over_peak": round(min(v["goodput_at_2x_over_peak"]
                                                 for v in results.values()), 3)},
        "realtime_attainment_min": round(min(rt), 4) if rt else None,
        "also": {"edge_capacity_over_chunked": ratio(results, "edge", "capacity_over_chunked"),
                 "longprompt_capacity_over_chunked": ratio(results, "longprompt",
                                                           "capacity_over_chunked")},
        "runs": {f"{w} on {m}": v for (m, w), v in results.items()},
    }
    path = save("slo_sustained", body)
    print(f"ratios {body['ratios']}, real-time min {body['realtime_attainment_min']}: {path}")


if __name__ == "__main__":
    main()
