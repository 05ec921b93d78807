"""A latency profile of this machine as it serves, not as it computes alone.

`sloserve profile` times steps in a quiet process. Served, the same engine shares the machine
with the HTTP server's process, tokenization and, where the load is generated on the same
box, the client: on a 2-core CPU the tuner's predictions from a quiet profile were 33-46%
above the capacities then measured (benchmarks/results/tune_cpu.json, 2026-12-02). So the
profile is checked under load: the workload is served under `slice`, whose pacing learns how
much slower than the profile decode-only steps and steps with prompts run (CalibratedSteps,
logged in the engine's stats line), and the profile is scaled by those two factors.

The factors depend on the load they are learned at (an overloaded server runs bigger, longer
steps beside a busier HTTP process): learned at the capacity the quiet profile predicts, they
were ~2x on this CPU and the prediction fell below what the server then held. So the rate is
searched: the factors learned at rate r predict a capacity f(r), lower as r grows, and the
rate where f(r) = r is bisected on the tuner's ladder, a few served runs in all."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from sloserve.core.latency import LatencyModel
from sloserve.sim.run import Deployment
from sloserve.tune.search import SCREEN, Problem, evaluate, rate
from sloserve.tune.space import Candidate, default_candidate
from sloserve.tune.verify import measure_served, served

# what CalibratedSteps.state() writes into the stats line
_SPEEDS = re.compile(r"steps take x([\d.]+) \(decode\) / x([\d.]+) \(with prompts\)")
STATS_INTERVAL_S = 5
MAX_ROUNDS = 4  # served runs: the bracket of ~10 rungs halves each round


def served_speeds(log_text: str) -> tuple[float, float] | None:
    """(decode, with prompts) factors of the last stats line that has them."""
    found = _SPEEDS.findall(log_text)
    return (float(found[-1][0]), float(found[-1][1])) if found else None


def scaled(model: LatencyModel, decode: float, prompt: float) -> LatencyModel:
    """The profile with decode-only costs times `decode` and prompt costs times `prompt`."""
    return LatencyModel(
        model.decode_batch, tuple(s * decode for s in model.decode_s),
        model.prefill_tokens, tuple(s * prompt for s in model.prefill_s),
        model.decode_context, model.context_s_per_token * decode, model.mixed_batch,
        tuple(s * prompt for s in model.mixed_s_per_token), model.source,
        model.attention_s_per_pair * prompt)


def calibrate_served(problem: Problem, k: int, seconds: float, folder: Path,
                     model: str | None = None) -> Path:
    """Serve the problem's workload at ladder rate k for `seconds` under slice with its
    latency profile, and write that profile scaled by the speeds slice learned beside it;
    returns the new profile's path."""
    profile = Path(problem.hardware.latency_profile)
    candidate = Candidate("slice")
    flags = [*problem.serve_flags(), "--log-stats-interval-s", str(STATS_INTERVAL_S)]
    with served(candidate, model, folder, flags) as server:
        measure_served(server.url, problem, k, seconds)
        speeds = served_speeds(server.log.read_text())
    if speeds is None:
        raise RuntimeError(f"no pacing line in {server.log}: cannot calibrate the profile")
    data = json.loads(profile.read_text())
    model = scaled(LatencyModel.from_dict(data), *speeds)
    out = profile.with_name(profile.stem + "-served.json")
    out.write_text(json.dumps({**data, **model.to_dict(), "served_calibration": {
        "decode": speeds[0], "with_prompts": speeds[1], "rate": rate(k),
        "seconds": seconds}}, indent=2))
    print(f"served at {rate(k):.3g} req/s, steps took x{speeds[0]:.2f} (decode) / "
          f"x{speeds[1]:.2f} (with prompts) the quiet profile: {out}", flush=True)
    return out


def calibrated_problem(problem: Problem, seconds: float, folder: Path,
                       model: str | None = None) -> Problem:
    """The problem with its (quiet) profile calibrated at the rate where the defaults'
    predicted capacity equals the rate served."""
    def capacity(p: Problem) -> int:
        return evaluate(p, default_candidate(), 0, False, SCREEN).capacity_k or 0

    def served_at(k: int) -> tuple[Problem, int]:
        path = calibrate_served(problem, k, seconds, folder, model)
        calibrated = dataclasses.replace(problem, hardware=Deployment(latency_profile=str(path)))
        return calibrated, capacity(calibrated)

    hi = capacity(problem)  # the quiet profile's prediction: served, at most this
    best, lo = served_at(hi)
    k = hi
    for _ in range(MAX_ROUNDS - 1):
        if hi - lo <= 1:
            break
        k = (lo + hi) // 2
        best, predicted = served_at(k)
        if abs(predicted - k) <= 1:
            break
        lo, hi = (k, hi) if predicted > k else (lo, k)
    print(f"served calibration at {rate(k):.3g} req/s", flush=True)
    return best
