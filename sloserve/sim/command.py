"""`sloserve sim`: the same workloads and results folders as `sloserve bench`, simulated."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from sloserve.errors import UsageError
from sloserve.flags import (
    add_dataclass_flags,
    add_role_limit_flags,
    add_scheduler_flags,
    from_flags,
    role_overrides,
    scheduler_config,
)
from sloserve.sim.run import Deployment, simulate
from sloserve.workload import report
from sloserve.workload.args import (
    add_workload_args,
    all_at_once,
    build_requests,
    effective_rate,
    plan_rates,
)


def add_sim_args(p: argparse.ArgumentParser) -> None:
    add_workload_args(p)
    add_dataclass_flags(p, Deployment)
    add_scheduler_flags(p)
    add_role_limit_flags(p.add_argument_group("disaggregated: one role's instances"))
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most, as `sloserve bench` caps them")
    p.add_argument("--goodput-search", action="store_true",
                   help="binary-search the highest rate whose attainment meets --target")
    p.add_argument("--out", default=None)
    p.add_argument("--label", default=None)


def deployment(args: argparse.Namespace) -> Deployment:
    if args.num_instances <= 0:
        raise UsageError("--num-instances must be positive")
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        raise UsageError("--max-concurrency must be positive")
    d = from_flags(Deployment, args, scheduler=scheduler_config(args),
                   prefill=role_overrides(args, "prefill"), decode=role_overrides(args, "decode"))
    try:
        d.roles()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return d


def run_rate(d: Deployment, args: argparse.Namespace, rate: float | None, folder: Path
             ) -> tuple[float, dict]:
    """Simulate one rate and save it: (its x on plots, its summary)."""
    _, requests = build_requests(args, rate, with_text=False)
    try:
        records, duration = simulate(d, requests, max_concurrency=args.max_concurrency)
    except ValueError as e:
        raise UsageError(str(e)) from None
    x = effective_rate(requests, rate)
    return x, report.save_rate(folder, x, records, duration, all_at_once(requests, rate))


def goodput_search(d: Deployment, args: argparse.Namespace, folder: Path) -> dict[float, dict]:
    """Double the rate until attainment drops below target, then bisect (as DistServe)."""
    summaries: dict[float, dict] = {}

    def attain(rate: float) -> float:
        x, summaries[x] = run_rate(d, args, rate, folder)
        return summaries[x]["slo_attainment"]

    lo, hi = 0.0, args.request_rate or 1.0
    while attain(hi) >= args.target and hi < 1e4:
        lo, hi = hi, hi * 2
    for _ in range(6):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if attain(mid) >= args.target else (lo, mid)
    return summaries


def cmd_sim(args: argparse.Namespace) -> None:
    d = deployment(args)
    folder = Path(args.out or f"sim-results/{time.strftime('%Y%m%d-%H%M%S')}")
    started = time.perf_counter()
    if args.goodput_search:
        summaries = goodput_search(d, args, folder)
    else:
        summaries = {}
        for rate in plan_rates(args):
            x, summaries[x] = run_rate(d, args, rate, folder)
    hardware = f"{d.gpu} {d.model_shape}" if d.gpu else (d.latency_profile or "CPU profile")
    label = args.label or f"sim {args.policy} on {hardware}"
    run = report.save_run(folder, label, summaries, args.target, {
        "simulated": True, "workload": args.workload, "policy": args.policy,
        "hardware": hardware, "deployment": dataclasses.asdict(d),
        "args": {k: v for k, v in vars(args).items() if k != "func"}})
    print(report.table([run]))
    print(f"simulated in {time.perf_counter() - started:.1f} s; results: {folder}")
