"""Edge CPU: sloserve vs llama.cpp's `llama-server` on the same GGUF, the same client, one
server at a time, in one command.

Both serve the embedded SmolLM2-135M-Instruct (Q4_1 GGUF) with the same thread count; sloserve
runs it with --quantization int4. The bench client streams every request (temperature 0, EOS
ignored, prompt caching off on both) and measures:

1. single stream: one request at a time, decode tokens/s (1 / TPOT), median of --repeats;
2. 32 Vicuna prompts at once, 128 tokens each: output tokens/s, median of --repeats;
3. the edge mix (30% real-time), --seconds of Poisson arrivals per rate: llama-server with
   --parallel slots climbs the rate ladder until its real-time attainment drops below 60%;
   sloserve `slice` runs the same rates, `edf` and `fcfs` the last one (the named rate).

llama-server comes from LLAMA_SERVER=path, or is built once from llama-cpp-python's source
archive (which vendors llama.cpp) under ~/.cache/sloserve/llamacpp (~10 minutes on 2 cores).
Writes benchmarks/results/cpu_vs_llamacpp.json with "ratios" (sloserve / llama-server).

    python benchmarks/cpu_vs_llamacpp.py [--threads 2] [--repeats 3] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, stop_server  # noqa: E402

from sloserve.bench.client import ClientConfig, run_requests, wait_until_healthy  # noqa: E402
from sloserve.model.loader import embedded_gguf  # noqa: E402
from sloserve.request import SLO  # noqa: E402
from sloserve.workload import spec as workloads  # noqa: E402
from sloserve.workload.datasets import vicuna_questions  # noqa: E402
from sloserve.workload.metrics import summarize  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist vendors llama.cpp
CACHE = Path.home() / ".cache" / "sloserve" / "llamacpp"


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


# AMX off: a native build enables it on Zen 4 and segfaults at the first token. AVX-512 only
# where the CPU has it (an AVX2-only machine dies of an illegal instruction otherwise).
CMAKE_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON",
               f"-DGGML_AVX512={'ON' if _cpu_has('avx512f') else 'OFF'}",
               "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_TILE=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_SERVER=ON", "-DCMAKE_BUILD_TYPE=Release"]
PORT = 8391
EDGE_RATES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # req/s, climbed until llama-server < 60%
RT_FLOOR = 0.6
LOG = Path("bench-results/cpu_vs_llamacpp")


def llama_server() -> Path:
    """LLAMA_SERVER, or the cached build, or a fresh build from the registry's source."""
    if os.environ.get("LLAMA_SERVER"):
        return Path(os.environ["LLAMA_SERVER"])
    found = sorted(CACHE.glob("*/vendor/llama.cpp/build/bin/llama-server"))
    if found:
        return found[-1]
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary=:all:",
                    "--no-deps", LLAMA_CPP_PYTHON, "-d", str(CACHE)], check=True)
    archive = next(CACHE.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE, filter="data")
    source = next(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))
    print(f"building llama-server in {source} (~10 minutes on 2 cores)", flush=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-B", "build", *generator, *CMAKE_FLAGS], cwd=source, check=True)
    subprocess.run(["cmake", "--build", "build", f"-j{os.cpu_count()}", "--target",
                    "llama-server"], cwd=source, check=True)
    return source / "build" / "bin" / "llama-server"


def llama_command(binary: Path, threads: int, slots: int, context: int) -> list[str]:
    return [str(binary), "-m", str(embedded_gguf()), "--host", "127.0.0.1", "--port", str(PORT),
            "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(context),
            "-cb", "--no-webui"]


def sloserve_command(threads: int, policy: str) -> list[str]:
    return [sys.executable, "-m", "sloserve.cli", "serve", "--port", str(PORT),
            "--quantization", "int4", "--threads", str(threads), "--policy", policy,
            "--no-enable-prefix-caching", "--max-tokens-default", "512"]


@contextlib.contextmanager
def serving(command: list[str], name: str):
    """The server of `command` on PORT until the block ends; its log under LOG."""
    LOG.mkdir(parents=True, exist_ok=True)
    with open(LOG / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_healthy(f"http://127.0.0.1:{PORT}", proc, timeout=600)
            yield ClientConfig(f"http://127.0.0.1:{PORT}", ignore_eos=True)
        finally:
            stop_server(proc, 30)


def no_cache(config: ClientConfig) -> ClientConfig:
    """llama-server reuses a slot's prompt KV unless told not to (sloserve: a flag)."""
    return ClientConfig(config.base_url, ignore_eos=True, extra_body={"cache_prompt": False})


def chat(index: int, text: str, max_tokens: int, arrival: float = 0.0) -> workloads.RequestSpec:
    return workloads.RequestSpec(index, 0, max_tokens, "default", SLO(), arrival, text, True)


def single_stream(config: ClientConfig, repeats: int) -> list[float]:
    """Decode tokens/s of one stream at a time, one figure per repeat (median of 3 prompts)."""
    out = []
    questions = vicuna_questions()
    for repeat in range(repeats):
        specs = [chat(i, questions[(3 * repeat + i) % len(questions)], 128) for i in range(3)]
        records = []
        for spec in specs:
            records += asyncio.run(run_requests(config, [spec]))[0]
        assert all(r.ok and r.output_tokens == 128 for r in records), records
        out.append(statistics.median(1e3 / r.tpot_ms for r in records))
    return out


def batch32(config: ClientConfig, repeats: int) -> list[float]:
    """Output tokens/s of 32 Vicuna prompts sent at once, 128 tokens each."""
    questions = vicuna_questions()[:32]
    out = []
    for _ in range(repeats):
        records, duration = asyncio.run(run_requests(
            config, [chat(i, q, 128) for i, q in enumerate(questions)]))
        assert all(r.ok and r.output_tokens == 128 for r in records), records
        out.append(sum(r.output_tokens for r in records) / duration)
    return out


def edge_run(config: ClientConfig, rate: float, seconds: float) -> dict:
    spec = workloads.load("edge")
    requests = workloads.build(spec, max(1, int(rate * seconds)), seed=0, rate=rate)
    records, duration = asyncio.run(run_requests(config, requests))
    s = summarize(records, duration)
    return {"rate": rate, "num_requests": len(records), "failed": s["failed"],
            "slo_attainment": round(s["slo_attainment"], 4), "goodput": round(s["goodput"], 3),
            "output_tok_s": round(s["output_throughput"], 1),
            "per_class": {c: round(v["slo_attainment"], 4) for c, v in s["per_class"].items()},
            "realtime_tpot_p90_ms": s["per_class"]["realtime"]["tpot_ms"]["p90"],
            "realtime_ttft_p90_ms": s["per_class"]["realtime"]["ttft_ms"]["p90"]}


def spread(values: list[float]) -> dict:
    return {"min": round(min(values), 1), "median": round(statistics.median(values), 1),
            "max": round(max(values), 1), "runs": [round(v, 1) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="seconds of arrivals per edge rate (>= 60 for SLO figures)")
    parser.add_argument("--edge-slots", type=int, default=8, help="llama-server --parallel")
    parser.add_argument("--no-edge", action="store_true",
                        help="single stream and batch of 32 only (a few minutes)")
    args = parser.parse_args()
    binary = llama_server()
    t = args.threads
    commands = {
        "llama_single": llama_command(binary, t, 1, 2048),
        "llama_batch": llama_command(binary, t, 32, 8192),
        "llama_edge": llama_command(binary, t, args.edge_slots, 8192),
        **{f"sloserve_{p}": sloserve_command(t, p) for p in ("fcfs", "slice", "edf")}}
    result: dict = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (embedded), both servers",
                    "threads": t, "commands": {k: " ".join(v) for k, v in commands.items()},
                    "seconds_per_edge_rate": args.seconds}

    def measure(name: str, work):
        with serving(commands[name], name) as config:
            if name.startswith("llama"):
                config = no_cache(config)
            value = work(config)
        print(f"{name}: {value}", flush=True)
        return value

    single = {"llama_server": spread(measure("llama_single", lambda c: single_stream(
        c, args.repeats)))}
    single["sloserve"] = spread(measure("sloserve_fcfs", lambda c: single_stream(
        c, args.repeats)))
    batch = {"llama_server": spread(measure("llama_batch", lambda c: batch32(c, args.repeats))),
             "sloserve": spread(measure("sloserve_fcfs", lambda c: batch32(c, args.repeats)))}
    result["single_stream_decode_tok_s"], result["batch32_output_tok_s"] = single, batch
    result["ratios"] = {
        "single_stream_decode": round(single["sloserve"]["median"]
                                      / single["llama_server"]["median"], 2),
        "batch32_output_throughput": round(batch["sloserve"]["median"]
                                           / batch["llama_server"]["median"], 2)}
    if not args.no_edge:
        edge_sweep(args, commands, measure, result)
    path = save("cpu_vs_llamacpp", result)
    print(f"ratios: {result['ratios']}; wrote {path}")


def edge_sweep(args, commands: dict, measure, result: dict) -> None:
    """llama-server up the rate ladder until real-time attainment < 60%; sloserve beside."""

    def llama_ladder(config: ClientConfig) -> list[dict]:
        runs = []
        for rate in EDGE_RATES:
            runs.append(edge_run(config, rate, args.seconds))
            print(f"  llama-server {rate} req/s: {runs[-1]['per_class']}", flush=True)
            if runs[-1]["per_class"]["realtime"] < RT_FLOOR:
                break
        return runs

    edge = {"llama_server": measure("llama_edge", llama_ladder)}
    rates = [r["rate"] for r in edge["llama_server"]]
    named = rates[-1]
    edge["sloserve_slice"] = measure("sloserve_slice", lambda c: [
        edge_run(c, r, args.seconds) for r in rates])
    for policy in ("edf", "fcfs"):
        edge[f"sloserve_{policy}"] = measure(f"sloserve_{policy}", lambda c: [
            edge_run(c, named, args.seconds)])
    result["edge"] = edge
    at = {name: next(r for r in runs if r["rate"] == named) for name, runs in edge.items()}
    result["edge_named_rate"] = named
    result["edge_realtime_attainment"] = {
        "sloserve_slice": at["sloserve_slice"]["per_class"]["realtime"],
        "llama_server": at["llama_server"]["per_class"]["realtime"]}
    result["ratios"]["edge_goodput"] = round(
        at["sloserve_slice"]["goodput"] / max(at["llama_server"]["goodput"], 1e-9), 2)
    print(f"real-time attainment at {named} req/s: {result['edge_realtime_attainment']}")


if __name__ == "__main__":
    main()
