"""`sloserve tune`: the configuration that meets a stated SLO at the highest load, searched
by simulation, written as a ready command line and a file for `sloserve serve --config`."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from sloserve.config import QUANTIZATIONS
from sloserve.core.policies import policy_names
from sloserve.errors import UsageError
from sloserve.sim.run import Deployment, latency_model
from sloserve.tune.search import (
    SCREEN,
    SUSTAINED,
    Evaluation,
    Problem,
    RunLength,
    Tuner,
    rate,
)
from sloserve.tune.space import coarse_grid
from sloserve.workload import spec as workloads


def add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="edge",
                   help=f"a YAML/JSON file or one of: {', '.join(workloads.available())}")
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment to meet")
    p.add_argument("--slo-scale", type=float, default=1.0,
                   help="multiply every objective of the workload (hardware slower than its "
                        "SLOs assume)")
    g = p.add_argument_group("hardware")
    g.add_argument("--latency-profile", default=None, help="JSON from `sloserve profile`")
    g.add_argument("--gpu", default=None,
                   help="h100 | h200 | a100: an analytic roofline; with --latency-profile, "
                        "the GPU sizes the KV cache and the profile prices steps")
    g.add_argument("--model-shape", default="llama-3-8b", help="with --gpu")
    g.add_argument("--profile-now", action="store_true",
                   help="profile this machine first (with --model; default the embedded one)")
    g.add_argument("--model", default=None, help="with --profile-now and --verify")
    g.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="with --profile-now and --verify: as `serve --quantization`")
    g.add_argument("--calibrate-seconds", type=float, default=40.0,
                   help="with --profile-now: serve the workload this long to learn how much "
                        "slower steps run served than profiled (0: trust the quiet profile)")
    g.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--num-gpus", type=int, default=1,
                   help="several: also search colocated / disagg / tropical layouts")
    p.add_argument("--policies", default=None, help="comma-separated (default: every one)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--finalists", type=int, default=2,
                   help="the best few re-measured with sustained runs (60 s, 10,000 requests)")
    p.add_argument("--quick", action="store_true",
                   help="shorter sustained runs (60 s, 2,000 requests): for a first look")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="serve the top N for real and measure them at the predicted capacity "
                        "and 1.2x it")
    p.add_argument("--verify-seconds", type=float, default=60.0)
    p.add_argument("--serve-flags", default="",
                   help="with --verify: more `sloserve serve` flags for the engine, e.g. "
                        "\"--model dummy:llama-3.1-8b --dtype bfloat16 --max-model-len 32768\"")
    p.add_argument("--out", default=None, help="results folder (default: tune-results/TIME)")


def problem(args: argparse.Namespace, folder: Path) -> Problem:
    if not 0 < args.target <= 1:
        raise UsageError("--target must be in (0, 1]")
    if args.num_gpus < 1 or args.workers < 1 or args.slo_scale <= 0:
        raise UsageError("--num-gpus, --workers and --slo-scale must be positive")
    try:
        workload = workloads.load(args.workload).scaled(args.slo_scale)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.profile_now:
        return profiled_problem(workload, folder, args.model, args.quantization,
                                args.calibrate_seconds, args.target, args.seed)
    hardware = Deployment(latency_profile=args.latency_profile, gpu=args.gpu,
                          model_shape=args.model_shape, num_kv_blocks=args.num_kv_blocks)
    try:
        latency_model(hardware)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    return Problem(workload, hardware, args.target, args.seed, args.quantization)


def profiled_problem(workload: workloads.WorkloadSpec, folder: Path, model: str | None = None,
                     quantization: str = "none", calibrate_seconds: float = 40.0,
                     target: float = 0.9, seed: int = 0) -> Problem:
    """The problem on this machine: profiled now, then (calibrate_seconds > 0) corrected by
    serving the workload at the defaults' predicted capacity (tune/calibrate.py)."""
    quiet = profile_this_machine(model, folder, quantization)
    problem = Problem(workload, Deployment(latency_profile=str(quiet)), target, seed,
                      quantization)
    if calibrate_seconds <= 0:
        return problem
    from sloserve.tune.calibrate import calibrated_problem

    return calibrated_problem(problem, calibrate_seconds, folder, model)


def profile_this_machine(model: str | None, folder: Path, quantization: str = "none") -> Path:
    from sloserve.config import EngineConfig
    from sloserve.engine import LLMEngine
    from sloserve.profiler import profile

    engine = LLMEngine(EngineConfig(model=model, quantization=quantization))
    path = folder / "latency-profile.json"
    folder.mkdir(parents=True, exist_ok=True)
    model_ = profile(engine, [1, 2, 4, 8, 16, 32, 64], [16, 64, 256, 1024])
    path.write_text(json.dumps({"model": engine.model_name, **model_.to_dict()}, indent=2))
    engine.shutdown()
    print(f"profiled this machine: {path}")
    return path


def cmd_tune(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    folder = Path(args.out or f"tune-results/{time.strftime('%Y%m%d-%H%M%S')}")
    prob = problem(args, folder)
    policies = args.policies.split(",") if args.policies else policy_names()
    unknown = set(policies) - set(policy_names())
    if unknown:
        raise UsageError(f"unknown policy {sorted(unknown)[0]!r}; choose from "
                         f"{', '.join(policy_names())}")
    space = coarse_grid(policies, args.num_gpus)
    sustained = RunLength(60.0, 2000) if args.quick else SUSTAINED
    started = time.perf_counter()
    with tqdm(unit="candidate", desc="tuning") as bar:
        tuner = Tuner(prob, args.workers, SCREEN, sustained, finalists=args.finalists,
                      on_progress=bar.update)
        ranked = tuner.run(space, args.num_gpus)
    elapsed = time.perf_counter() - started
    report = write_results(folder, args, tuner, ranked, elapsed)
    print(report)
    if args.verify:
        from sloserve.tune.verify import verify

        print(verify(tuner.final[: args.verify], prob, args, folder))


def write_results(folder: Path, args: argparse.Namespace, tuner: Tuner,
                  ranked: list[Evaluation], elapsed: float) -> str:
    """tune.json (every candidate), tuned.yaml (the winner, for serve --config), a plot."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    rows = [row(e) for e in ranked]
    winner = tuner.final[0] if tuner.final and tuner.final[0].capacity_k is not None else None
    body = {"workload": args.workload, "target": args.target, "slo_scale": args.slo_scale,
            "hardware": _hardware(args), "num_gpus": args.num_gpus, "seed": args.seed,
            "candidates_evaluated": len(tuner.results), "wall_s": round(elapsed, 1),
            "ranked": rows}
    (folder / "tune.json").write_text(json.dumps(body, indent=2) + "\n")
    lines = [table(ranked[:12], args.target),
             f"{len(tuner.results)} candidates in {elapsed:.0f} s; results: {folder}"]
    if winner is None:
        closest = max(ranked, key=lambda e: max((p["slo_attainment"] for p in
                                                 e.points.values()), default=0.0))
        best = max((p["slo_attainment"] for p in closest.points.values()), default=0.0)
        lines.append(f"nothing meets {args.target:.0%} attainment at any rate; closest is "
                     f"{closest.candidate.describe()} (best attainment seen: {best:.1%})")
        return "\n".join(lines)
    extra = tuner.problem.serve_flags()
    config = {**winner.candidate.config_file(), **tuner.problem.engine()}
    (folder / "tuned.yaml").write_text(
        f"# sloserve tune --workload {args.workload} --target {args.target}: "
        f"{winner.per_gpu:.3g} req/s per GPU predicted\n"
        + yaml.safe_dump(config, sort_keys=False))
    plot(tuner.final, args.target, folder / "attainment.png")
    base = tuner.baseline()
    gain = (f" ({winner.per_gpu / base.per_gpu:.2f}x the defaults' {base.per_gpu:.3g})"
            if base is not None and base.per_gpu else "")
    lines += [f"winner: {winner.candidate.describe()}: {winner.per_gpu:.3g} req/s per GPU"
              f"{gain}",
              "run it:  sloserve serve " + " ".join(winner.candidate.flags() + extra),
              f"     or:  sloserve serve --config {folder / 'tuned.yaml'}"]
    return "\n".join(lines)


def _hardware(args: argparse.Namespace) -> str:
    if args.gpu:
        return f"{args.gpu} roofline, {args.model_shape}"
    return args.latency_profile or ("profiled now" if args.profile_now else "shipped CPU profile")


def row(e: Evaluation) -> dict:
    at = e.at_capacity or {}
    return {"candidate": e.candidate.describe(), "sustained": e.sustained,
            "capacity_req_s": e.capacity, "capacity_per_gpu": round(e.per_gpu, 4),
            "below_req_s": None if e.below_k is None else rate(e.below_k),
            "ttft_p90_ms": at.get("ttft_p90_ms"), "tpot_p90_ms": at.get("tpot_p90_ms"),
            "config": e.candidate.config_file(), "points": e.points}


def table(ranked: list[Evaluation], target: float) -> str:
    head = (f"{'#':>3} {'candidate':58s} {'capacity/GPU':>12} {'p90 TTFT':>9} {'p90 TPOT':>9}"
            f"  (highest rate with >= {target:.0%} attainment)")
    lines = [head]
    for i, e in enumerate(ranked, 1):
        at = e.at_capacity or {}
        cap = (f"< {rate(e.below_k) / e.candidate.num_instances:.3g}" if e.below_k is not None
               else f"{e.per_gpu:.3g}") + ("" if e.sustained else "*")
        lines.append(f"{i:3d} {e.candidate.describe():58s} {cap:>12} "
                     f"{_ms(at.get('ttft_p90_ms')):>9} {_ms(at.get('tpot_p90_ms')):>9}")
    lines.append(f"* screening runs ({SCREEN.seconds:g} s of arrivals); the rest: sustained runs")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def plot(final: list[Evaluation], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for e in final:
        rates = sorted(e.points)
        ax.plot(rates, [e.points[r]["slo_attainment"] for r in rates], marker="o",
                label=e.candidate.describe())
    ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (simulated)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
