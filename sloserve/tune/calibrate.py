"""A latency profile of this machine as it serves, not as it computes alone.

`sloserve profile` times steps in a quiet process. Served, the same engine shares the machine
with the HTTP server's process, tokenization and, where the load is generated on the same
box, the client: on a 2-core CPU the tuner's predictions from a quiet profile were 33-46%
above the capacities then measured (benchmarks/results/tune_cpu.json, 2026-12-02). So the
profile is checked once under load: the workload is served under `slice`, whose pacing
learns how much slower than the profile decode-only steps and steps with prompts run
(CalibratedSteps, logged in the engine's stats line), and the profile is scaled by those two
factors."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sloserve.core.latency import LatencyModel
from sloserve.tune.search import Problem, rate
from sloserve.tune.space import Candidate
from sloserve.tune.verify import measure_served, served

# what CalibratedSteps.state() writes into the stats line
_SPEEDS = re.compile(r"steps take x([\d.]+) \(decode\) / x([\d.]+) \(with prompts\)")
STATS_INTERVAL_S = 5


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
