"""`sloserve bench` and `sloserve bench compare`."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from sloserve.errors import UsageError
from sloserve.workload import report
from sloserve.workload.args import (
    add_workload_args,
    all_at_once,
    build_requests,
    effective_rate,
    plan_rates,
)


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


def cmd_bench(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    # here, not at the top: `sloserve --help` must work without the bench extra (httpx)
    from sloserve.bench.client import ClientConfig, EndpointError, resolve_model, run_requests

    rates = plan_rates(args)
    build_requests(args, rates[0], with_text=False)  # a bad workload fails before any traffic
    config = ClientConfig(args.base_url, args.model, args.api_key, args.max_concurrency,
                          not args.no_slo_field, args.ignore_eos)
    try:
        model = asyncio.run(resolve_model(config))
    except EndpointError as e:
        raise UsageError(str(e)) from None
    folder = Path(args.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}")
    summaries = {}
    with tqdm(total=len(rates) * args.num_requests, unit="req") as bar:
        for rate in rates:
            spec, requests = build_requests(args, rate)
            burst = all_at_once(requests, rate)
            bar.set_description("all at once" if burst else f"{effective_rate(requests, rate):g}"
                                                             " req/s")
            records, duration = asyncio.run(run_requests(config, requests, lambda: bar.update()))
            x = effective_rate(requests, rate)
            summaries[x] = report.save_rate(folder, x, records, duration, burst)
    run = report.save_run(folder, args.label or model, summaries, args.target, {
        "workload": spec.name, "model": model, "base_url": args.base_url,
        "args": {k: v for k, v in vars(args).items() if k != "func"}})
    print(report.table([run]))
    print(f"results: {folder}")


def cmd_compare(args: argparse.Namespace) -> None:
    try:
        runs = [report.load_run(folder) for folder in args.runs]
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    report.plot(runs, out)
    print(report.table(runs))
    print(f"plots: {', '.join(str(out / p) for p in report.PLOTS)}")
