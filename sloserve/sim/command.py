"""`sloserve sim`: the same workloads and results folders as `sloserve bench`, simulated."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from sloserve.bench import report
from sloserve.bench.command import BenchError, add_workload_args, build_requests, plan_rates
from sloserve.bench.command import effective_rate
from sloserve.core.policies import make_policy
from sloserve.core.scheduler import SchedulerConfig
from sloserve.sim.run import Deployment, simulate


def add_sim_args(p: argparse.ArgumentParser) -> None:
    add_workload_args(p)
    p.add_argument("--policy", default="fcfs")
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy knob, e.g. delay_factor=0.5 or ratio=0.8 (repeatable)")
    p.add_argument("--latency-profile", default=None, help="JSON from `sloserve profile`")
    p.add_argument("--gpu", default=None, help="h100 | h200 | a100: analytic roofline")
    p.add_argument("--model-shape", default="llama-3-8b", help="with --gpu")
    p.add_argument("--num-instances", type=int, default=1)
    p.add_argument("--router", default="round_robin", help="round_robin | least_loaded")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--mode", choices=["colocated", "disagg", "tropical"], default="colocated",
                   help="disagg: instances [0, --partition-id) prefill, the rest decode; "
                        "tropical: disagg, and decode instances may take prompts")
    p.add_argument("--partition-id", type=int, default=1)
    p.add_argument("--transfer-gb-s", type=float, default=25.0,
                   help="disagg: KV handoff bandwidth, GB/s")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--goodput-search", action="store_true",
                   help="binary-search the highest rate whose attainment meets --target")
    p.add_argument("--out", default=None)
    p.add_argument("--label", default=None)


def deployment(args: argparse.Namespace) -> Deployment:
    options = {}
    for item in args.policy_option:
        key, _, value = item.partition("=")
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    try:
        make_policy(args.policy, **options)
        scheduler = SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens,
                                    args.max_model_len, args.policy, options)
    except (TypeError, ValueError, OSError) as e:
        raise BenchError(f"policy {args.policy}: {e}") from None
    if args.num_instances <= 0:
        raise BenchError("--num-instances must be positive")
    d = Deployment(args.latency_profile, args.gpu, args.model_shape, args.num_instances,
                   args.router, scheduler, args.num_kv_blocks, mode=args.mode,
                   partition_id=args.partition_id, transfer_gb_s=args.transfer_gb_s)
    try:
        d.roles()
    except ValueError as e:
        raise BenchError(str(e)) from None
    return d


def run_rate(d: Deployment, args: argparse.Namespace, rate: float | None
             ) -> tuple[float, list, float]:
    _, requests = build_requests(args, rate, with_text=False)
    try:
        records, duration = simulate(d, requests)
    except ValueError as e:
        raise BenchError(str(e)) from None
    return effective_rate(requests, rate), records, duration


def goodput_search(d: Deployment, args: argparse.Namespace, folder: Path) -> dict[float, dict]:
    """Double the rate until attainment drops below target, then bisect (as DistServe)."""
    summaries: dict[float, dict] = {}

    def attain(rate: float) -> float:
        x, records, duration = run_rate(d, args, rate)
        summaries[x] = report.save_rate(folder, x, records, duration)
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
            x, records, duration = run_rate(d, args, rate)
            summaries[x] = report.save_rate(folder, x, records, duration)
    hardware = f"{d.gpu} {d.model_shape}" if d.gpu else (d.latency_profile or "CPU profile")
    label = args.label or f"sim {args.policy} on {hardware}"
    run = report.save_run(folder, label, summaries, args.target, {
        "simulated": True, "workload": args.workload, "policy": args.policy,
        "hardware": hardware, "deployment": dataclasses.asdict(d),
        "args": {k: v for k, v in vars(args).items() if k != "func"}})
    print(report.table([run]))
    print(f"simulated in {time.perf_counter() - started:.1f} s; results: {folder}")
