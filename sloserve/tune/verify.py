"""`sloserve tune --verify N`: serve each of the top N for real (`sloserve serve` in a child
process) and load it with the bench client at the predicted capacity and ~1.2x it, beside
what the simulator predicted for the same requests."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from sloserve.bench.client import ClientConfig, run_requests, wait_until_healthy
from sloserve.tune.search import SUSTAINED, Evaluation, Problem, measure, rate
from sloserve.tune.space import Candidate
from sloserve.workload import spec as workloads
from sloserve.workload.metrics import summarize

HIGHER = 2  # rungs above the capacity: 1.1^2 = 1.21x


def verify(finals: list[Evaluation], problem: Problem, args, folder: Path) -> str:
    lines = [f"{'candidate':58s} {'rate':>7} {'predicted':>9} {'measured':>9}"]
    for e in finals:
        if e.capacity_k is None:
            continue
        with served(e.candidate, args.model, folder, problem.serve_flags()) as server:
            for k in (e.capacity_k, e.capacity_k + HIGHER):
                predicted = e.points.get(rate(k)) or measure(problem, e.candidate, k, SUSTAINED)
                measured = measure_served(server.url, problem, k, args.verify_seconds)
                lines.append(f"{e.candidate.describe():58s} {rate(k):7.3g} "
                             f"{predicted['slo_attainment']:9.1%} {measured:9.1%}")
    return "\n".join(lines)


def measure_served(url: str, problem: Problem, k: int, seconds: float) -> float:
    """SLO attainment of a real server under `seconds` of Poisson arrivals at rate k. Replies
    run to their max_tokens (EOS ignored), as the simulator assumes: it cannot know where a
    model would stop."""
    r = rate(k)
    specs = workloads.build(problem.workload, max(10, math.ceil(r * seconds)), problem.seed,
                            rate=r)
    client = ClientConfig(url, ignore_eos=True)
    records, duration = asyncio.run(run_requests(client, specs))
    return summarize(records, duration)["slo_attainment"]


class Served(NamedTuple):
    url: str
    log: Path  # the server's output


@contextlib.contextmanager
def served(candidate: Candidate, model: str | None, folder: Path,
           extra: list[str] = ()) -> Iterator[Served]:
    """`sloserve serve` with the candidate's flags on a free port, until the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "sloserve.cli", "serve", "--port", str(port),
            *candidate.flags(), *extra, *(["--model", model] if model else [])]
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"serve-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, proc)
            yield Served(url, log_path)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

