"""`sloserve bench` and `sloserve bench compare`."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from sloserve.bench import report, workload
from sloserve.bench.client import ClientConfig, EndpointError, resolve_model, run_requests


class BenchError(ValueError):
    """Bad bench input: printed as one line, exit code 2."""


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--api-key", default=None)
    add_workload_args(p)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--no-slo-field", action="store_true",
                   help="leave sloserve's `slo` extension out of the request body")
    p.add_argument("--out", default=None, help="results folder (default: bench-results/TIME)")
    p.add_argument("--label", default=None, help="name of this run in plots (default: model)")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="edge",
                   help=f"a YAML/JSON file or one of: {', '.join(workload.available())}")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=None, help="req/s; default: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--interval", type=float, default=None, help="one request every N seconds")
    p.add_argument("--sweep-rates", default=None, help="comma-separated rates, one run each")
    p.add_argument("--time-scale", type=float, default=None,
                   help="replay the trace's own arrivals, stretched by this factor")
    p.add_argument("--target", type=float, default=0.9, help="attainment target for sweeps")
    p.add_argument("--seed", type=int, default=0)


def plan_rates(args: argparse.Namespace) -> list[float | None]:
    """The request rates to run: the sweep, or the one --request-rate (None: another process)."""
    if args.num_requests <= 0:
        raise BenchError("--num-requests must be positive")
    if not 0 < args.target <= 1:
        raise BenchError("--target must be in (0, 1]")
    if args.sweep_rates:
        try:
            rates = [float(r) for r in args.sweep_rates.split(",")]
        except ValueError:
            raise BenchError(f"--sweep-rates takes numbers, got {args.sweep_rates!r}") from None
    else:
        rates = [args.request_rate]
    if any(r is not None and r <= 0 for r in rates):
        raise BenchError("request rates must be > 0")
    return rates


def build_requests(args: argparse.Namespace, rate: float | None, with_text: bool = True):
    try:
        spec = workload.load(args.workload)
        return spec, workload.build(spec, args.num_requests, args.seed, with_text, rate=rate,
                                    burstiness=args.burstiness, interval=args.interval,
                                    time_scale=args.time_scale)
    except ValueError as e:
        raise BenchError(str(e)) from None


def effective_rate(requests, rate: float | None) -> float:
    """The x of the attainment plot: the configured rate, or what the arrivals amount to."""
    if rate is not None:
        return rate
    span = max(r.arrival for r in requests) if requests else 0.0
    return round(len(requests) / span, 3) if span > 0 else float(len(requests))


def cmd_bench(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    rates = plan_rates(args)
    build_requests(args, rates[0], with_text=False)  # a bad workload fails before any traffic
    config = ClientConfig(args.base_url, args.model, args.api_key, args.max_concurrency,
                          not args.no_slo_field, args.ignore_eos)
    try:
        model = asyncio.run(resolve_model(config))
    except EndpointError as e:
        raise BenchError(str(e)) from None
    folder = Path(args.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}")
    summaries = {}
    with tqdm(total=len(rates) * args.num_requests, unit="req") as bar:
        for rate in rates:
            spec, requests = build_requests(args, rate)
            bar.set_description(f"rate {rate}")
            records, duration = asyncio.run(run_requests(config, requests, lambda: bar.update()))
            x = effective_rate(requests, rate)
            summaries[x] = report.save_rate(folder, x, records, duration)
    run = report.save_run(folder, args.label or model, summaries, args.target, {
        "workload": spec.name, "model": model, "base_url": args.base_url,
        "args": {k: v for k, v in vars(args).items() if k != "func"}})
    print(report.table([run]))
    print(f"results: {folder}")


def cmd_compare(args: argparse.Namespace) -> None:
    try:
        runs = [report.load_run(folder) for folder in args.runs]
    except ValueError as e:
        raise BenchError(str(e)) from None
    out = Path(args.out)
    report.plot(runs, out)
    print(report.table(runs))
    print(f"plots: {', '.join(str(out / p) for p in report.PLOTS)}")
