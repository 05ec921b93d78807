"""Simulator fidelity: the engine on this CPU (SmolLM2) vs the simulator driven by a CPU
latency profile, same requests and arrival times, at two load levels.

Prints mean and p90 TTFT and TPOT of both and the worst relative error; target: within 15%.
The profile is measured at the start of the run (pass --profile to use a saved one), so both
sides see the machine in the same state. Replies run to max_tokens (ignore EOS), as the
simulator's do.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve.bench.local import run_engine  # noqa: E402
from sloserve.config import EngineConfig, SchedulerConfig  # noqa: E402
from sloserve.core.latency import LatencyModel  # noqa: E402
from sloserve.engine import LLMEngine  # noqa: E402
from sloserve.sim.cluster import Cluster, InstanceConfig, SimInstance  # noqa: E402
from sloserve.workload import spec as workload  # noqa: E402
from sloserve.workload.metrics import summarize  # noqa: E402

METRICS = [("ttft_ms", "mean"), ("ttft_ms", "p90"), ("tpot_ms", "mean"), ("tpot_ms", "p90")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="1.5,3")
    parser.add_argument("--num-requests", type=int, default=60)
    parser.add_argument("--policy", default="fcfs")
    parser.add_argument("--profile", default=None, help="a saved latency profile")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(scheduler=SchedulerConfig(policy=args.policy)))
    if args.profile:
        latency = LatencyModel.from_file(args.profile)
    else:
        from sloserve.profiler import profile

        latency = profile(engine, [1, 2, 4, 8, 16, 32, 64], [16, 64, 256, 1024])
    spec = workload.load("vicuna")
    rows, worst = [], 0.0
    for rate in map(float, args.rates.split(",")):
        requests = workload.build(spec, args.num_requests, seed=1, rate=rate)
        for r in requests:  # the simulator gets the very tokens the engine will see, so
            # that prefix caching (the shared system prompt) saves both the same work
            tokens = engine.apply_chat_template([{"role": "user", "content": r.text}])
            r.prompt_len, r.extra["tokens"] = len(tokens), tokens
        real, real_s = run_engine(engine, [dataclasses.replace(r) for r in requests],
                                  ignore_eos=True)
        instance = SimInstance(engine.scheduler.config, InstanceConfig(
            engine.blocks.num_blocks, engine.blocks.block_size, enable_prefix_caching=True),
            latency)
        sim, sim_s = Cluster([instance]).run(requests)
        a, b = summarize(real, real_s), summarize(sim, sim_s)
        for metric, stat in METRICS:
            measured, simulated = a[metric][stat], b[metric][stat]
            error = abs(simulated - measured) / measured
            worst = max(worst, error)
            rows.append({"rate": rate, "metric": f"{stat} {metric}", "engine": measured,
                         "simulator": simulated, "error": error})
            print(f"rate {rate:4g}  {stat:>4s} {metric:8s} engine {measured:8.1f}  "
                  f"sim {simulated:8.1f}  error {error:6.1%}", flush=True)
    print(f"worst error: {worst:.1%} (target <= 15%)")
    save("sim_fidelity", {"policy": args.policy, "workload": "vicuna, ignore EOS",
                          "rows": rows, "worst_error": round(worst, 4)})


if __name__ == "__main__":
    main()
