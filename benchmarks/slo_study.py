"""SLO study: attainment vs request rate and goodput for every policy, simulated.

Two workloads (the SLICE-style edge mix, and LongBench-like long prompts) on two machines
(Llama-3-8B on an H200, analytic roofline; SmolLM2-135M on this 2-core CPU, the shipped
measured profile). Writes docs/slo-study.md and its plots. One command:

    python benchmarks/slo_study.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402
from policy_compare import scaled  # noqa: E402

from sloserve.config import SchedulerConfig  # noqa: E402
from sloserve.sim.run import Deployment, simulate  # noqa: E402
from sloserve.workload import report  # noqa: E402
from sloserve.workload import spec as workload  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
POLICIES = ("fcfs", "delay", "chunked", "edf", "slice")
MACHINES = {  # name -> (deployment fields, SLO scale for the edge mix, rates for a unit load)
    "h200-llama3-8b": ({"gpu": "h200", "model_shape": "llama-3-8b"}, 1.0),
    "cpu-smollm2": ({}, 2.0),
}
WORKLOADS = ("edge", "longbench")
# requests per point: enough to load each machine (an H200 takes 2,000 edge requests at once)
NUM_REQUESTS = {("edge", "h200-llama3-8b"): 2000, ("edge", "cpu-smollm2"): 300,
                ("longbench", "h200-llama3-8b"): 100, ("longbench", "cpu-smollm2"): 100}
MULTIPLES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def deployment(machine: str, policy: str) -> Deployment:
    fields, _ = MACHINES[machine]
    budget = 512 if policy == "chunked" else 8192
    return Deployment(scheduler=SchedulerConfig(max_num_batched_tokens=budget,
                                                max_model_len=131072, policy=policy), **fields)


def spec_for(name: str, machine: str) -> workload.WorkloadSpec:
    spec = workload.load(name)
    return scaled(spec, MACHINES[machine][1]) if name == "edge" else spec


def attainment(spec, d: Deployment, rate: float, n: int, seed: int) -> tuple[list, float]:
    requests = workload.build(spec, n, seed, with_text=False, rate=rate)
    return simulate(d, requests)


def capacity(spec, machine: str, n: int, seed: int) -> float:
    """fcfs's highest rate with >= 90% attainment (doubling, then bisection)."""
    d = deployment(machine, "fcfs")

    def ok(rate: float) -> bool:
        records, duration = attainment(spec, d, rate, n, seed)
        return sum(r.attained for r in records) >= 0.9 * len(records)

    lo, hi = 0.0, 0.05
    while ok(hi) and hi < 1e4:  # a workload too small to load the machine stops the search
        lo, hi = hi, hi * 2
    for _ in range(6):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return max(lo, hi / 2)


def study(name: str, machine: str, seed: int, work: Path) -> list[report.Run]:
    """Runs go to a scratch folder; only the combined plots land in docs/."""
    spec, n = spec_for(name, machine), NUM_REQUESTS[name, machine]
    unit = capacity(spec, machine, n, seed)
    runs = []
    for policy in POLICIES:
        d = deployment(machine, policy)
        folder = work / f"{name}-{machine}" / policy
        summaries = {}
        for m in MULTIPLES:
            rate = round(unit * m, 4)
            records, duration = attainment(spec, d, rate, n, seed)
            summaries[rate] = report.save_rate(folder, rate, records, duration)
        runs.append(report.save_run(folder, policy, summaries, 0.9, {
            "simulated": True, "workload": name, "machine": machine}))
    report.plot(runs, DOCS / "slo-study" / f"{name}-{machine}")
    return runs


def markdown(results: dict[tuple[str, str], list[report.Run]], elapsed: float) -> str:
    lines = [
        "# SLO study (simulated)",
        "",
        "Made by `python benchmarks/slo_study.py` in "
        f"{elapsed:.0f} s: the simulator runs the real scheduler and policies; "
        "H200 step times come from an analytic roofline (80% of HBM bandwidth, 60% of bf16 "
        "peak, 2 ms per step), CPU step times from the measured profile "
        "`sloserve/core/profiles/cpu-2core-smollm2-135m.json`. "
        "Each point serves 2,000 (edge on the H200), 300 (edge on the CPU) or 100 (LongBench) "
        "requests; rates are multiples of the highest rate at which fcfs keeps "
        ">= 90% attainment. The edge mix runs at the SLOs of `workloads/edge.yaml` on the H200 "
        "and at twice them on the CPU (real-time TPOT 50 ms there is below one decode step). "
        "Simulated replies run to their cap (the edge mix's 96 tokens), which makes the CPU "
        "figures pessimistic next to measured ones (real replies stop earlier).",
        "",
    ]
    for (name, machine), runs in results.items():
        lines += [f"## {name} on {machine}", "",
                  "| policy | " + " | ".join(f"{r:g} req/s" for r in sorted(runs[0].summaries))
                  + " | max rate >= 90% |", "|---" * (len(runs[0].summaries) + 2) + "|"]
        for run in runs:
            cells = [f"{100 * run.summaries[r]['slo_attainment']:.0f}%"
                     + _rt(run.summaries[r]) for r in sorted(run.summaries)]
            lines.append(f"| {run.label} | " + " | ".join(cells)
                         + f" | {run.max_rate_meeting_target or '-'} |")
        folder = f"slo-study/{name}-{machine}"
        lines += ["", "Cells: overall attainment (real-time class in brackets where there is "
                  "one).", "",
                  f"![attainment]({folder}/attainment_vs_rate.png) "
                  f"![latency]({folder}/latency_bars.png)", "",
                  f"![cdf]({folder}/latency_cdf.png) ![queue]({folder}/queue_p90.png)", ""]
    lines += _paper_comparison(results)
    return "\n".join(lines) + "\n"


def _rt(summary: dict) -> str:
    rt = summary["per_class"].get("realtime")
    return f" ({100 * rt['slo_attainment']:.0f}%)" if rt else ""


def _paper_comparison(results) -> list[str]:
    lines = ["## Against the SLICE paper", "",
             "SLICE reports up to 35x higher SLO attainment than Orca- and FastServe-style "
             "schedulers on edge devices. Here, the largest ratio of slice's attainment to "
             "fcfs's (the Orca/vLLM-style baseline) at any simulated rate, overall and for the "
             "real-time class:", ""]
    for (name, machine), runs in results.items():
        by = {r.label: r for r in runs}
        line = f"- {name} on {machine}: overall " + _best_ratio(by, lambda s: s["slo_attainment"])
        if "realtime" in by["fcfs"].summaries[min(by["fcfs"].summaries)]["per_class"]:
            line += "; real-time class " + _best_ratio(
                by, lambda s: s["per_class"]["realtime"]["slo_attainment"])
        lines.append(line)
    lines += ["", "The paper's largest ratios come where the baseline is near 0% attainment. "
              "Overall attainment here moves less because fcfs keeps serving the looser "
              "classes; the real-time class is where slice's selection and rate control show. "
              "LongBench-like prompts (5k-24k tokens) on the 2-core CPU miss their 15 s TTFT "
              "for about half the requests at any rate: their prefill alone takes longer, so no "
              "policy can help there.", ""]
    return lines


def _best_ratio(by: dict, metric) -> str:
    """The rate where slice gains most over fcfs, as a ratio (or 0% -> x% when fcfs has 0%)."""
    def gain(x: float) -> tuple[float, float]:
        ours, base = metric(by["slice"].summaries[x]), metric(by["fcfs"].summaries[x])
        return (ours / base if base else float("inf") if ours else 1.0), ours

    x = max(by["fcfs"].summaries, key=gain)
    ratio, ours = gain(x)
    base = metric(by["fcfs"].summaries[x])
    shown = f"{ratio:.1f}x" if base else f"from 0% to {100 * ours:.0f}%"
    return f"{shown} at {x:g} req/s (fcfs {100 * base:.0f}%, slice {100 * ours:.0f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        results = {(w, m): study(w, m, args.seed, Path(work))
                   for w in WORKLOADS for m in MACHINES}
        elapsed = time.perf_counter() - started
        (DOCS / "slo-study.md").write_text(markdown(results, elapsed))
    save("slo_study", {"elapsed_s": round(elapsed, 1), "points": {
        f"{w}-{m}": {r.label: r.max_rate_meeting_target for r in runs}
        for (w, m), runs in results.items()}})
    print(f"wrote {DOCS / 'slo-study.md'} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
