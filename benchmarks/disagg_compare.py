"""Colocated vs disaggregated vs tropical on one GPU host, the simulator's prediction beside
each measured point.

Instances of a Llama-3-8B-shaped model (dummy weights, bf16) as Ray actors, `--replica-spec`
giving each one's tensor-parallel size (default two instances of one GPU): `colocated`
(replicas), `disagg` (instances before --partition-id prefill, the rest decode), `tropical`
(disagg, and decode instances may take prompts); KV moves over `--kv-transfer` (direct links
by default). Workloads: Mooncake and LongBench-like lengths (prompts capped at --max-prompt
tokens to fit the 8k context), Poisson arrivals at each rate, random prompt tokens, EOS
ignored. SLOs as the DistServe experiment: TTFT 5x the unloaded prefill time of the request's
own prompt (from the latency profile), TPOT 100 ms (--tpot-slo-ms). Per point: p90 TTFT, p90 TPOT,
attainment, goodput per GPU, mean KV transfer time; the simulator runs the same requests on
the same profile (tp=1 instances only). Results and a plot (measured solid, simulated dashed)
are saved after every point; `--replot FILE.json` redraws one.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve.bench.local import run_engine  # noqa: E402
from sloserve.cluster.frontend import ClusterEngine  # noqa: E402
from sloserve.config import (  # noqa: E402
    ClusterConfig,
    EngineConfig,
    SchedulerConfig,
    parse_replica_spec,
)
from sloserve.core.latency import LatencyModel  # noqa: E402
from sloserve.request import SLO  # noqa: E402
from sloserve.sim.run import Deployment, simulate  # noqa: E402
from sloserve.workload import spec as workloads  # noqa: E402
from sloserve.workload.metrics import summarize  # noqa: E402

PROFILE = Path(__file__).resolve().parents[1] / "sloserve/core/profiles/gpu-h100-llama-3-8b.json"
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # Llama-3-8B, bf16


def requests(name: str, n: int, rate: float, max_prompt: int, max_output: int,
             latency: LatencyModel, vocab: int, tpot_ms: float) -> list:
    specs = workloads.build(workloads.load(name), n, seed=1, with_text=False, rate=rate)
    rng = random.Random(0)
    for spec in specs:
        spec.prompt_len = min(spec.prompt_len, max_prompt)
        spec.max_tokens = max(2, min(spec.max_tokens, max_output))
        spec.extra["tokens"] = [rng.randrange(100, vocab - 100) for _ in range(spec.prompt_len)]
        spec.slo = SLO(ttft_ms=5e3 * latency.prefill_time(spec.prompt_len), tpot_ms=tpot_ms)
    return specs


def point(summary: dict, gpus: int) -> dict:
    return {"attainment": summary["slo_attainment"],
            "goodput_per_gpu": round(summary["goodput"] / gpus, 3),
            "p90_ttft_ms": summary["ttft_ms"]["p90"], "p90_tpot_ms": summary["tpot_ms"]["p90"]}


def capacity(points: list[dict], target: float = 0.9) -> dict:
    """DistServe's goodput: per mode and workload, the highest rate measured whose SLO
    attainment reached `target`, per GPU (None: no rate did)."""
    best: dict = {}
    for p in points:
        key = f"{p['mode']}/{p['workload']}"
        ok = p["measured"]["attainment"] >= target
        best.setdefault(key, None)
        if ok and (best[key] is None or p["rate"] / p["gpus"] > best[key]):
            best[key] = p["rate"] / p["gpus"]
    return best


def plot(results: dict, path: Path) -> Path:
    """Attainment and goodput per GPU vs rate, a column per workload: measured lines solid,
    the simulator's dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["points"]
    names = list(dict.fromkeys(p["workload"] for p in points))
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        for mode in dict.fromkeys(p["mode"] for p in points):
            rows = sorted((p for p in points if p["workload"] == name and p["mode"] == mode),
                          key=lambda p: p["rate"])
            rates = [p["rate"] for p in rows]
            for ax, key, scale in ((axes[0][col], "attainment", 100),
                                   (axes[1][col], "goodput_per_gpu", 1)):
                line, = ax.plot(rates, [scale * p["measured"][key] for p in rows],
                                marker="o", label=mode)
                ax.plot(rates, [scale * p["simulated"][key] for p in rows], linestyle="--",
                        color=line.get_color(), alpha=0.6, label=f"{mode} (simulated)")
        axes[0][col].set(title=f"{name}, TPOT SLO {results['tpot_slo_ms']:g} ms",
                         ylabel="SLO attainment (%)", ylim=(0, 105))
        axes[1][col].set(xlabel="request rate (req/s)", ylabel="goodput per GPU (req/s)")
        axes[0][col].legend(fontsize=7)
    fig.suptitle(f"{results.get('machine', '')}: {results.get('command', '')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--modes", default="colocated,disagg,tropical")
    parser.add_argument("--replica-spec", nargs="+", default=["1,1", "1,1"], metavar="TP,PP",
                        help="e.g. 2,1 2,1 with --partition-id 1 on four GPUs")
    parser.add_argument("--partition-id", type=int, default=1)
    parser.add_argument("--kv-transfer", choices=["object-store", "direct"], default="direct")
    parser.add_argument("--workloads", default="longbench,mooncake")
    parser.add_argument("--rates", default="1,2")
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--max-prompt", type=int, default=6000)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--tpot-slo-ms", type=float, default=100)
    parser.add_argument("--out", default="disagg_compare", help="result file name")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only draw the plot of an earlier result file, beside it")
    args = parser.parse_args()
    if args.replot:
        results = json.loads(args.replot.read_text())
        print(plot(results, args.replot.with_suffix(".png")), capacity(results["points"]))
        return
    latency = LatencyModel.from_file(PROFILE)
    engine_kwargs = dict(model=args.model, max_model_len=8192,
                         enable_prefix_caching=False, policy="chunked",
                         max_num_batched_tokens=4096, gpu_memory_utilization=0.85)
    results = {"profile": PROFILE.name, "engine": engine_kwargs,
               "kv_transfer": args.kv_transfer, "tpot_slo_ms": args.tpot_slo_ms,
               "points": []}
    spec = tuple(parse_replica_spec(args.replica_spec))
    gpus = sum(tp for tp, _ in spec)
    for mode in args.modes.split(","):
        cluster = ClusterEngine(ClusterConfig(mode=mode, replica_spec=spec,
                                              partition_id=args.partition_id,
                                              engine=EngineConfig.from_kwargs(**engine_kwargs),
                                              latency_profile=str(PROFILE),
                                              kv_transfer=args.kv_transfer))
        blocks = cluster.instances[0].stats.num_blocks
        for name in args.workloads.split(","):
            for rate in (float(r) for r in args.rates.split(",")):
                specs = requests(name, args.num_requests, rate, args.max_prompt,
                                 args.max_output, latency, cluster.model_config.vocab_size,
                                 args.tpot_slo_ms)
                records, duration = run_engine(cluster, specs, ignore_eos=True)
                measured = point(summarize(records, duration), gpus)
                transfers = [r for r in records if r.kv_transfer_ms is not None]
                mean_transfer = (sum(r.kv_transfer_ms for r in transfers) / len(transfers)
                                 if transfers else None)
                gb_s = (sum(r.prompt_tokens for r in transfers) * KV_BYTES_PER_TOKEN / 1e9
                        / (sum(r.kv_transfer_ms for r in transfers) / 1e3)) if transfers else 25
                sim_d = Deployment(latency_profile=str(PROFILE), num_instances=len(spec),
                                   partition_id=args.partition_id,
                                   mode=mode,  # routed as the front end routes
                                   scheduler=SchedulerConfig(256, 4096, 8192, "chunked"),
                                   num_kv_blocks=blocks, transfer_gb_s=gb_s)
                sim_records, sim_duration = simulate(sim_d, specs)
                row = {"mode": mode, "workload": name, "rate": rate,
                       "replica_spec": args.replica_spec, "gpus": gpus,
                       "measured": measured, "simulated": point(
                           summarize(sim_records, sim_duration), gpus),
                       "mean_kv_transfer_ms": mean_transfer,
                       "prefilled_on_decode": sum(1 for r in records if not r.error
                                                  and r.kv_transfer_ms is None)
                       if mode == "tropical" else None,
                       "errors": sum(1 for r in records if r.error)}
                results["points"].append(row)
                results["rate_per_gpu_at_90pct"] = capacity(results["points"])
                print(row, flush=True)
                plot(results, save(args.out, results).with_suffix(".png"))
        cluster.shutdown()
        del cluster
        gc.collect()
        time.sleep(3)  # the actors' GPUs are released


if __name__ == "__main__":
    main()
