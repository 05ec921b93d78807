"""`sloserve tune` on this CPU, checked against the real server in the same run.

1. Profile this machine (the embedded SmolLM2, --quantization int4 as edge users serve it),
   then serve the workload once at the defaults' predicted capacity and scale the profile by
   how much slower steps ran served (sloserve/tune/calibrate.py): the tuner's latency model.
2. Tune for the edge workload (objectives x --slo-scale: the shipped ones assume faster
   hardware), target 90% attainment, by simulation.
3. Serve the defaults (`sloserve serve`, fcfs) and the winner for real and load each with the
   bench client at rates around its predicted capacity (--seconds of Poisson arrivals per
   rate, replies to their max_tokens as the simulator assumes); the measured capacity is the
   highest rate whose attainment reaches the target.

Writes benchmarks/results/tune_cpu.json with "ratios": {"tuned_over_default_capacity",
"prediction_error" (|predicted - measured| / measured, for the winner)}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve.config import QUANTIZATIONS  # noqa: E402
from sloserve.tune.command import profiled_problem, row  # noqa: E402
from sloserve.tune.search import SUSTAINED, Problem, Tuner, rate  # noqa: E402
from sloserve.tune.space import coarse_grid  # noqa: E402
from sloserve.tune.verify import measure_served, served  # noqa: E402
from sloserve.workload import spec as workloads  # noqa: E402


def measured_capacity(candidate, problem: Problem, around: int, seconds: float,
                      folder: Path) -> tuple[float, dict[float, float]]:
    """Highest ladder rate whose attainment reaches the target: from two rungs below the
    prediction, up until a rung misses, or down until one passes (six rungs at most)."""
    points: dict[float, float] = {}
    with served(candidate, None, folder, problem.serve_flags()) as server:
        def attains(k: int) -> bool:
            points[rate(k)] = measure_served(server.url, problem, k, seconds)
            print(f"  {candidate.describe()} at {rate(k):.3g} req/s: {points[rate(k)]:.1%}",
                  flush=True)
            return points[rate(k)] >= problem.target

        k = around - 2
        step = 1 if attains(k) else -1
        for _ in range(6):
            k += step
            if attains(k) != (step == 1):  # up: the first miss; down: the first pass
                break
    passing = [r for r, a in points.items() if a >= problem.target]
    return max(passing, default=0.0), points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slo-scale", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="seconds of arrivals per measured rate")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--quantization", default="int4", choices=QUANTIZATIONS)
    parser.add_argument("--calibrate-seconds", type=float, default=40.0,
                        help="served calibration of the profile (0: the quiet profile)")
    args = parser.parse_args()
    folder = Path("tune-results/cpu")
    started = time.time()
    problem = profiled_problem(workloads.load("edge").scaled(args.slo_scale), folder,
                               quantization=args.quantization,
                               calibrate_seconds=args.calibrate_seconds, target=args.target)
    tuner = Tuner(problem, workers=2)
    ranked = tuner.run(coarse_grid())
    winner, default = tuner.final[0], tuner.baseline()
    print(f"predicted: winner {winner.candidate.describe()} {winner.capacity:.3g} req/s, "
          f"defaults {default.capacity:.3g} req/s", flush=True)
    measured: dict[str, dict] = {}
    for name, e in (("defaults", default), ("winner", winner)):
        if name == "winner" and e.candidate == default.candidate:  # the same server again
            measured[name] = dict(measured["defaults"])
            continue
        cap, points = measured_capacity(e.candidate, problem, e.capacity_k, args.seconds,
                                        folder)
        measured[name] = {"candidate": e.candidate.describe(), "predicted_req_s": e.capacity,
                          "measured_req_s": cap, "attainment_by_rate": points,
                          "flags": e.candidate.flags()}
    ratio = (measured["winner"]["measured_req_s"] / measured["defaults"]["measured_req_s"]
             if measured["defaults"]["measured_req_s"] else None)
    error = (abs(winner.capacity - measured["winner"]["measured_req_s"])
             / measured["winner"]["measured_req_s"]
             if measured["winner"]["measured_req_s"] else None)
    path = save("tune_cpu", {
        "workload": f"edge, objectives x {args.slo_scale}", "target": args.target,
        "model": f"SmolLM2-135M-Instruct (embedded), quantization {args.quantization}",
        "latency_profile": "measured in this run" + (
            f", then calibrated by {args.calibrate_seconds:g} s served"
            if args.calibrate_seconds > 0 else ""),
        "served_calibration": json.loads(Path(problem.hardware.latency_profile).read_text())
        .get("served_calibration"),
        "seconds_per_rate": args.seconds,
        "sustained_sim": {"seconds": SUSTAINED.seconds, "min_requests": SUSTAINED.min_requests},
        "candidates_evaluated": len(tuner.results), "measured": measured,
        "ratios": {"tuned_over_default_capacity": ratio, "prediction_error": error},
        "ranked": [row(e) for e in ranked[:20]], "wall_s": round(time.time() - started)})
    print(f"tuned / default measured capacity: {ratio}; prediction error: {error}; "
          f"wrote {path}")


if __name__ == "__main__":
    main()
