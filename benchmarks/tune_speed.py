"""How long `sloserve tune` takes: the whole search for one workload on a simulated GPU
(roofline) with a Llama-3-8B shape, every policy, every worker of this machine.

Writes benchmarks/results/tune_speed.json: candidates evaluated, wall time, the winner and
the defaults (sustained runs). Target: >= 200 candidates in < 3 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve.sim.run import Deployment  # noqa: E402
from sloserve.tune.command import row  # noqa: E402
from sloserve.tune.search import Problem, Tuner  # noqa: E402
from sloserve.tune.space import coarse_grid  # noqa: E402
from sloserve.workload import spec as workloads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="edge")
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--model-shape", default="llama-3-8b")
    args = parser.parse_args()
    problem = Problem(workloads.load(args.workload),
                      Deployment(gpu=args.gpu, model_shape=args.model_shape))
    started = time.perf_counter()
    tuner = Tuner(problem, workers=os.cpu_count() or 1)
    ranked = tuner.run(coarse_grid())
    wall = time.perf_counter() - started
    winner, default = tuner.final[0], tuner.baseline()
    print(f"{len(tuner.results)} candidates in {wall:.0f} s; winner {winner.candidate.describe()}"
          f" {winner.capacity:.3g} req/s, defaults {default.capacity:.3g} req/s")
    save("tune_speed", {
        "workload": args.workload, "hardware": f"{args.gpu} roofline, {args.model_shape}",
        "workers": os.cpu_count(), "candidates_evaluated": len(tuner.results),
        "wall_s": round(wall, 1), "target": {"candidates": 200, "wall_s": 180},
        "winner": row(winner), "defaults": row(default),
        "ranked": [row(e) for e in ranked[:10]]})


if __name__ == "__main__":
    main()
