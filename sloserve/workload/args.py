"""The command-line flags of a workload run, shared by `sloserve bench` and `sloserve sim`."""

from __future__ import annotations

import argparse

from sloserve.errors import UsageError
from sloserve.workload import spec as workload


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
        raise UsageError("--num-requests must be positive")
    if not 0 < args.target <= 1:
        raise UsageError("--target must be in (0, 1]")
    if args.sweep_rates:
        try:
            rates = [float(r) for r in args.sweep_rates.split(",")]
        except ValueError:
            raise UsageError(f"--sweep-rates takes numbers, got {args.sweep_rates!r}") from None
    else:
        rates = [args.request_rate]
    if any(r is not None and r <= 0 for r in rates):
        raise UsageError("request rates must be > 0")
    return rates


def build_requests(args: argparse.Namespace, rate: float | None, with_text: bool = True):
    try:
        spec = workload.load(args.workload)
        return spec, workload.build(spec, args.num_requests, args.seed, with_text, rate=rate,
                                    burstiness=args.burstiness, interval=args.interval,
                                    time_scale=args.time_scale)
    except ValueError as e:
        raise UsageError(str(e)) from None


def all_at_once(requests, rate: float | None) -> bool:
    """No arrival process: every request is sent at the start (a burst, not a rate)."""
    return rate is None and all(r.arrival == 0 for r in requests)


def effective_rate(requests, rate: float | None) -> float:
    """The x of the attainment plot: the configured rate, or what the arrivals amount to."""
    if rate is not None:
        return rate
    span = max(r.arrival for r in requests) if requests else 0.0
    return round(len(requests) / span, 3) if span > 0 else float(len(requests))
