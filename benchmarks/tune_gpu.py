"""`sloserve tune` for one GPU, checked against the real engine on that GPU.

The search needs no GPU (it simulates); the check does. So two stages, each a subcommand,
merged into benchmarks/results/tune_gpu_<GPU>.json:

    python benchmarks/tune_gpu.py search --gpu h100            # here: the tuner, by simulation
    python benchmarks/tune_gpu.py verify --gpu h100 --rank 1   # on that GPU, a finalist a call

`search`: the long-prompt mix (the edge SLO classes over LongBench-like prompts of 3k-29k
tokens), target 90% attainment, the shipped latency profile of that GPU measured with
Llama-3-8B (its memory sizes the KV cache), every policy, sustained finalist runs (>= 60 s,
>= 10,000 requests). `verify`: serves the finalist of that rank for real (dummy Llama-3.1-8B
weights of the same shape, bf16, 32k context) and loads it with the bench client at its
predicted capacity and 1.21x it (60 s of Poisson arrivals each, the simulator's requests as
token ids, EOS ignored, a 20 s grace after the last arrival), beside the simulated attainment
at the same rates, as `sloserve tune --verify` prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

from sloserve.sim.run import Deployment  # noqa: E402
from sloserve.tune.command import row  # noqa: E402
from sloserve.tune.search import Evaluation, Problem, Tuner, rate  # noqa: E402
from sloserve.tune.space import Candidate, coarse_grid  # noqa: E402
from sloserve.tune.verify import verified  # noqa: E402
from sloserve.workload import spec as workloads  # noqa: E402

WORKLOAD = "longprompt"
SERVE_FLAGS = ["--model", "dummy:llama-3.1-8b", "--dtype", "bfloat16",
               "--gpu-memory-utilization", "0.9", "--max-model-len", "32768"]
FOLDER = Path("tune-results/gpu")


def problem(gpu: str) -> Problem:
    profile = f"sloserve/core/profiles/gpu-{gpu}-llama-3-8b.json"
    return Problem(workloads.load(WORKLOAD), Deployment(latency_profile=profile, gpu=gpu))


def search(args) -> dict:
    prob = problem(args.gpu)
    started = time.time()
    tuner = Tuner(prob, workers=args.workers)
    ranked = tuner.run(coarse_grid())
    base = tuner.baseline()
    return {"machine": machine(), "command": "python " + " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M"), "gpu": args.gpu,
            "workload": WORKLOAD, "target": prob.target,
            "latency_profile": prob.hardware.latency_profile,
            "candidates_evaluated": len(tuner.results), "wall_s": round(time.time() - started),
            "defaults_capacity_req_s": base.capacity if base else None,
            "finalists": [row(e) | {"capacity_k": e.capacity_k} for e in tuner.final],
            "ranked": [row(e) for e in ranked[:20]]}


def finalist(entry: dict) -> Evaluation:
    """The Evaluation a search recorded, enough to verify it."""
    c = entry["config"]
    candidate = Candidate(c["policy"], tuple(sorted(c.get("policy_options", {}).items())),
                          c["max_num_seqs"], c["max_num_batched_tokens"])
    return Evaluation(candidate, entry["capacity_k"],
                      points={float(r): p for r, p in entry["points"].items()}, sustained=True)


def verify(args, record: dict) -> dict:
    prob = problem(args.gpu)
    chosen = finalist(record["search"]["finalists"][args.rank - 1])
    started = time.time()
    rows = verified([chosen], prob, None, SERVE_FLAGS, FOLDER, args.seconds)
    return {"device": machine(), "command": "python " + " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M"), "serve_flags": SERVE_FLAGS,
            "seconds_per_rate": args.seconds, "wall_s": round(time.time() - started),
            "predicted_capacity_req_s": rate(chosen.capacity_k), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    s = sub.add_parser("search")
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    v = sub.add_parser("verify")
    v.add_argument("--rank", type=int, default=1, help="which finalist (1: the winner)")
    v.add_argument("--seconds", type=float, default=60.0, help="seconds of arrivals per rate")
    for p in (s, v):
        p.add_argument("--gpu", default="h100", choices=("h100", "h200"),
                       help="whose shipped latency profile (and memory) the search used")
    args = parser.parse_args()
    path = RESULTS / f"tune_gpu_{args.gpu}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if args.stage == "search":
        record = {"search": search(args)}  # a new search voids earlier checks
    else:
        record.setdefault("verify", {})[str(args.rank)] = verify(args, record)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record.get("verify", record["search"]["finalists"]), indent=1)[:3000])


if __name__ == "__main__":
    main()
