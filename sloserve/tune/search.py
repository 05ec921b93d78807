"""The search: each candidate's capacity (the highest request rate whose SLO attainment meets
the target) found by simulation on a geometric ladder of rates, candidates pruned against the
best so far, the best refined along each axis, and the finalists re-measured with sustained
runs. Deterministic for a seed: every candidate sees the same requests at a given rate, and
candidates run in fixed batches whose outcome does not depend on which worker finished first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sloserve.sim.run import Deployment, simulate
from sloserve.tune.space import Candidate, coarse_grid, default_candidate, neighbours
from sloserve.workload import spec as workloads
from sloserve.workload.metrics import summarize

STEP = 1.1  # ladder: rate(k) = STEP ** k requests/s
LOWEST, HIGHEST = -60, 110  # 0.003 to 36,000 requests/s


@dataclass(frozen=True)
class RunLength:
    """How long one simulated run at rate r is: at least `seconds` of arrivals and at least
    `min_requests` requests. Never fewer seconds: a short burst flatters every candidate."""

    seconds: float
    min_requests: int

    def requests(self, rate: float) -> int:
        return max(self.min_requests, math.ceil(rate * self.seconds))


SCREEN = RunLength(6.0, 200)  # ranks candidates; finalists get sustained runs
SUSTAINED = RunLength(60.0, 10_000)  # the project's bar for SLO results in the simulator


@dataclass
class Evaluation:
    candidate: Candidate
    capacity_k: int | None = None  # ladder index of the capacity; None: below the ladder
    below_k: int | None = None  # pruned: misses the target at this rung already
    points: dict[float, dict] = field(default_factory=dict)  # rate -> what the sim measured
    sustained: bool = False

    @property
    def capacity(self) -> float:
        return 0.0 if self.capacity_k is None else rate(self.capacity_k)

    @property
    def per_gpu(self) -> float:
        return self.capacity / self.candidate.num_instances

    @property
    def at_capacity(self) -> dict | None:
        return self.points.get(round(self.capacity, 6))


def rate(k: int) -> float:
    return round(STEP ** k, 6)


@dataclass(frozen=True)
class Problem:
    """The workload, the hardware (a simulated Deployment without scheduler settings), the
    target attainment and the seed."""

    workload: workloads.WorkloadSpec
    hardware: Deployment
    target: float = 0.9
    seed: int = 0
    quantization: str = "none"  # of the engine profiled

    def serve_flags(self) -> list[str]:
        """What `sloserve serve` needs beside a candidate's flags to run as simulated: the
        engine profiled and the latency profile, which policies that price steps (slice)
        read."""
        return [f"--{key.replace('_', '-')}={value}" for key, value in self.engine().items()]

    def engine(self) -> dict[str, str]:
        """The same as serve settings (`serve --config` keys)."""
        out = {"quantization": self.quantization} if self.quantization != "none" else {}
        if self.hardware.latency_profile:
            out["latency_profile"] = self.hardware.latency_profile
        return out


def measure(problem: Problem, candidate: Candidate, k: int, length: RunLength) -> dict:
    """Simulate the candidate at ladder rate k; the summary of what it attained."""
    r = rate(k)
    specs = workloads.build(problem.workload, length.requests(r), problem.seed,
                            with_text=False, rate=r)
    deployment = dataclasses.replace(
        problem.hardware, scheduler=candidate.scheduler(), mode=candidate.mode,
        num_instances=candidate.num_instances, partition_id=candidate.partition_id)
    # a run stops as soon as it has missed the target for sure: most candidates are pruned so
    allowed = math.floor((1 - problem.target) * len(specs) + 1e-9)
    records, duration = simulate(deployment, specs, max_misses=allowed)
    s = summarize(records, duration)
    attained = sum(r.attained for r in records)  # requests not run to the end: misses
    return {"slo_attainment": attained / len(specs), "goodput": s["goodput"],
            "ttft_p90_ms": s["ttft_ms"]["p90"], "tpot_p90_ms": s["tpot_ms"]["p90"],
            "num_requests": len(specs), "stopped_early": len(records) < len(specs)}


def search_capacity(passes: Callable[[int], bool], start: int, prune: bool,
                    near: bool = False) -> tuple[int | None, int | None]:
    """(capacity k, pruned-below k) on the ladder, probing from `start`. With `prune`, a miss
    at `start` ends the search there (the candidate is worse than the incumbent), and a pass
    climbs one rung at a time: a contender is rarely far above the incumbent, and a run far
    past its capacity is the costliest to simulate. `near`: start is an estimate of the
    capacity (a finalist's screening), so passes climb one rung at a time too."""
    if not passes(start):
        if prune:
            return None, start
        hi, step = start, 1  # descend until a rung passes
        while True:
            lo = max(LOWEST, hi - step)
            if passes(lo):
                break
            if lo == LOWEST:
                return None, None
            hi, step = lo, step * 2
    else:
        lo, step = start, 1  # climb until a rung misses
        while True:
            hi = min(HIGHEST, lo + step)
            if hi == lo or not passes(hi):
                break
            lo, step = hi, step if prune or near else step * 2
        if hi == lo:
            return lo, None
    while hi - lo > 1:  # lo passes, hi misses
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    return lo, None


def evaluate(problem: Problem, candidate: Candidate, start: int, prune: bool,
             length: RunLength, sustained: bool = False) -> Evaluation:
    ev = Evaluation(candidate, sustained=sustained)

    def passes(k: int) -> bool:
        point = measure(problem, candidate, k, length)
        ev.points[rate(k)] = point
        return point["slo_attainment"] >= problem.target

    ev.capacity_k, ev.below_k = search_capacity(passes, start, prune, near=sustained)
    return ev


def _evaluate_job(args) -> Evaluation:
    return evaluate(*args)


@dataclass
class Tuner:
    problem: Problem
    workers: int = 1
    screen: RunLength = SCREEN
    sustained: RunLength = SUSTAINED
    refine_rounds: int = 3
    finalists: int = 2
    on_progress: Callable[[int], None] = lambda n: None  # called with candidates done
    results: dict[Candidate, Evaluation] = field(default_factory=dict)
    final: list[Evaluation] = field(default_factory=list)

    def run(self, space: Iterable[Candidate] | None = None, num_gpus: int = 1) -> list[Evaluation]:
        """Coarse grid, refinement, sustained finalists; returns every evaluation ranked
        (finalists first, by sustained capacity per GPU). Ctrl-C ends the search early with
        what it has."""
        self.default = dataclasses.replace(default_candidate(), num_instances=num_gpus)
        grid = list(space) if space is not None else coarse_grid(num_gpus=num_gpus)
        if space is None or self.default in grid:  # first: the rest is measured against them
            grid = [self.default, *(c for c in grid if c != self.default)]
        pool = multiprocessing.get_context("fork").Pool(self.workers) if self.workers > 1 \
            else contextlib.nullcontext()
        with pool:
            self._pool = pool
            try:
                self._batch([grid[0]], prune=False, starts=[0])
                self._batch(grid[1:], prune=True)
                for _ in range(self.refine_rounds):
                    best = self._best()
                    fresh = [n for e in self.ranked()[:3] for n in neighbours(e.candidate)
                             if n not in self.results]
                    self._batch(list(dict.fromkeys(fresh)), prune=True)
                    if self._best() == best:
                        break
                self._finals(grid[0])
            except KeyboardInterrupt:  # report what was found (the pool's exit stops it)
                pass
        return self.ranked()

    def _best(self) -> int | None:
        ks = [e.capacity_k for e in self.results.values() if e.capacity_k is not None]
        return max(ks, default=None)

    def _batch(self, candidates: list[Candidate], prune: bool,
               starts: list[int] | None = None, length: RunLength | None = None
               ) -> list[Evaluation]:
        """Evaluate in batches of a few per worker, each batch against the best before it
        (or from `starts`, one per candidate)."""
        size = max(1, self.workers) * 2
        out = []
        for i in range(0, len(candidates), size):
            best = self._best()
            first = best if best is not None else 0
            jobs = [(self.problem, c, starts[i + j] if starts else first,
                     prune and best is not None, length or self.screen, length is not None)
                    for j, c in enumerate(candidates[i:i + size])]
            done = self._pool.map(_evaluate_job, jobs) if self.workers > 1 else \
                [_evaluate_job(job) for job in jobs]
            for ev in done:
                if length is None:
                    self.results[ev.candidate] = ev
                out.append(ev)
            self.on_progress(len(done))
        return out

    def _finals(self, baseline: Candidate) -> None:
        """The best few and the baseline again, each with sustained runs from its screening
        capacity."""
        top = [e for e in self.ranked() if e.capacity_k is not None][: self.finalists]
        chosen = list(dict.fromkeys([e.candidate for e in top] + [baseline]))
        starts = [self.results[c].capacity_k if self.results[c].capacity_k is not None
                  else (self.results[c].below_k or 0) for c in chosen]
        self.final = self._batch(chosen, prune=False, starts=starts, length=self.sustained)
        self.final.sort(key=lambda e: (-e.per_gpu, e.candidate))

    def ranked(self) -> list[Evaluation]:
        finals = {e.candidate for e in self.final}
        rest = sorted((e for c, e in self.results.items() if c not in finals),
                      key=lambda e: (-(e.per_gpu), e.below_k is not None, e.candidate))
        return [*self.final, *rest]

    def baseline(self) -> Evaluation | None:
        """The sustained evaluation of the defaults (None when they were not searched)."""
        return next((e for e in self.final if e.candidate == self.default), None)
