"""`sloserve tune --verify N`: serve each of the top N for real (`sloserve serve` in a child
process) and load it with the bench client at the predicted capacity and ~1.2x it, beside
what the simulator predicted for the same requests."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import shlex
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
GRACE_S = 20.0


def verify(finals: list[Evaluation], problem: Problem, args, folder: Path) -> str:
    rows = verified(finals, problem, args.model, shlex.split(args.serve_flags), folder,
                    args.verify_seconds)
    lines = [f"{'candidate':58s} {'rate':>7} {'predicted':>9} {'measured':>9}"]
    lines += [f"{r['candidate']:58s} {r['rate']:7.3g} {r['predicted']:9.1%} {r['measured']:9.1%}"
              for r in rows]
    return "\n".join(lines)


def verified(finals: list[Evaluation], problem: Problem, model: str | None,
             serve_flags: list[str], folder: Path, seconds: float) -> list[dict]:
    """Each finalist served for real at its predicted capacity and 1.21x it: the simulated
    and the measured attainment at each rate."""
    rows = []
    for e in finals:
        if e.capacity_k is None:
            continue
        with served(e.candidate, model, folder, [*problem.serve_flags(), *serve_flags]) \
                as server:
            for k in (e.capacity_k, e.capacity_k + HIGHER):
                predicted = e.points.get(rate(k)) or measure(problem, e.candidate, k, SUSTAINED)
                rows.append({"candidate": e.candidate.describe(), "rate": rate(k),
                             "predicted": predicted["slo_attainment"],
                             "measured": measure_served(server.url, problem, k, seconds)})
                print(f"  {rows[-1]}", flush=True)
    return rows


def measure_served(url: str, problem: Problem, k: int, seconds: float) -> float:
    """SLO attainment of a real server under `seconds` of Poisson arrivals at rate k, the
    requests the simulator saw: prompts of exactly their token counts (token ids), replies
    run to their max_tokens (EOS ignored: the simulator cannot know where a model would
    stop). Requests unfinished GRACE_S after the last arrival count as misses, so an
    overloaded run ends on time."""
    r = rate(k)
    specs = workloads.build(problem.workload, max(10, math.ceil(r * seconds)), problem.seed,
                            with_text=False, rate=r)
    ids = random.Random(problem.seed)
    for spec in specs:  # ids inside every vocabulary in play (49k for the embedded model)
        spec.extra["tokens"] = [ids.randrange(1000, 40000) for _ in range(spec.prompt_len)]
    client = ClientConfig(url, ignore_eos=True, cutoff_s=specs[-1].arrival + GRACE_S)
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

