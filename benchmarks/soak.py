"""A long run at a steady load: the server must not drift (issue: proof under abuse).

Starts `sloserve serve --quantization int4 --policy slice` on loopback and sends the edge mix
(30% real-time, objectives x2 for this CPU) at `--rate` req/s (default 2.4, ~80% of the
rate where slice's attainment falls below 90% here) for `--minutes`, through the bench
client; samples the server's resident memory every 10 s. Reports errors (503s of admission
control counted apart: refusing is its job), attainment per minute of arrivals, and RSS
idle / after the first minute / last / peak; growth is measured from the first minute's end
(the target: 0 errors, RSS flat within 10%, attainment steady), and the KV cache's usage
once the last request has ended (0: every block back). tests/server/test_soak.py runs it for
2 minutes. Writes benchmarks/results/soak.json:

    python benchmarks/soak.py [--minutes 30] [--rate 2.4]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import process_tree_rss_mb, save, stop_server  # noqa: E402

from sloserve.bench.client import ClientConfig, run_requests, wait_until_healthy  # noqa: E402
from sloserve.workload import spec as workload  # noqa: E402
from sloserve.workload.metrics import summarize  # noqa: E402

PORT = 8432
WARM_SAMPLES = 6  # RSS samples (10 s apart) in the first minute


class RSSSamples(threading.Thread):
    def __init__(self, pid: int, every: float = 10.0):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.running = pid, every, [], True

    def run(self) -> None:
        while self.running:
            self.samples.append(round(process_tree_rss_mb(self.pid)))
            time.sleep(self.every)


def kv_usage(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("sloserve:kv_cache_usage_perc"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError("kv_cache_usage_perc")


def soak(minutes: float, rate: float, port: int = PORT) -> dict:
    """Serve the edge mix at `rate` for `minutes`; what the run's result file holds."""
    spec = workload.load("edge").scaled(2.0)
    requests = workload.build(spec, int(minutes * 60 * rate), seed=0, rate=rate)
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sloserve.cli", "serve", "--port", str(port),
           "--quantization", "int4", "--policy", "slice", "--log-stats-interval-s", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rss = RSSSamples(proc.pid)
    try:
        wait_until_healthy(url, proc, 180)
        rss.start()
        records, duration = asyncio.run(run_requests(ClientConfig(url), requests))
        time.sleep(1.0)  # an abort or a last step lands in the engine process within this
        kv_after, alive = kv_usage(url), httpx.get(f"{url}/health").status_code == 200
    finally:
        rss.running = False
        stop_server(proc)
    per_minute = collections.defaultdict(list)
    for r in records:
        per_minute[int(r.send_time // 60)].append(r.attained)
    refused = sum("objective out of reach" in (r.error or "") for r in records)
    errors = collections.Counter(r.error[:60] for r in records
                                 if r.error and "objective out of reach" not in r.error)
    s = summarize(records, duration)
    result = {
        "server": " ".join(cmd[2:]), "minutes": minutes, "rate": rate,
        "requests_sent": len(requests), "requests": len(records), "errors": dict(errors),
        "refused_by_admission_control": refused,
        "kv_cache_usage_after": kv_after, "server_alive_after": alive,
        "slo_attainment": round(s["slo_attainment"], 4),
        "attainment_per_minute": [round(sum(v) / len(v), 3) for _, v in sorted(per_minute.items())],
        "rss_mb": {"idle": rss.samples[0], "after_first_minute": rss.samples[WARM_SAMPLES],
                   "last": rss.samples[-1], "peak": max(rss.samples), "samples": rss.samples},
    }
    # drift under steady load: from the first minute's end (the engine keeps the buffers
    # its first steps allocate, by design, so idle -> loaded is a one-off step up)
    result["rss_growth"] = round(rss.samples[-1] / rss.samples[WARM_SAMPLES] - 1, 3)
    result["rss_growth_from_idle"] = round(rss.samples[-1] / rss.samples[0] - 1, 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=2.4)
    args = ap.parse_args()
    result = soak(args.minutes, args.rate)
    print({k: v for k, v in result.items() if k != "rss_mb"},
          {k: v for k, v in result["rss_mb"].items() if k != "samples"})
    print(f"-> {save('soak', result)}")


if __name__ == "__main__":
    main()
