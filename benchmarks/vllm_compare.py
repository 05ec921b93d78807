"""sloserve vs vLLM on one GPU, one engine after the other in one device call.

Needs the GPU machine and `.whl/vllm` built by ../shared/tools/vllm-h100/build.sh (carried;
unpacked to /tmp/site with PYTHONPATH=/tmp/site:$PWD, as that folder's README says).
Llama-3-8B shape, dummy weights, bf16, both engines.

Parts (`--parts`, each fits one device call; a later run merges its parts into the file):
- offline: the folder's bench_vllm.py and bench_sloserve.py: 1,000 x (512 in / 256 out)
  output tok/s, and the decode step at batch 1 / 64 / 256 (context 1,024);
- server: both OpenAI servers, the folder's openai_load.py (streamed /v1/completions,
  512 in / 128 out, EOS ignored) at 20 req/s (200 requests) and 60 req/s (300 requests);
- slo: SLO capacity under the long-prompt mix (the edge mix's classes over LongBench-like
  prompts of 3k-29k tokens, token-id prompts, EOS ignored), through sloserve's bench client:
  60 s of Poisson arrivals per rate, rates ascending until attainment falls below 90%; a run
  ends 20 s after its last arrival (requests unfinished then count as misses). Engines
  (`--slo-engines`, any subset; a later run merges its engines in): vllm (default
  scheduler), vllm-priority (`--scheduling-policy priority`, real-time requests first),
  sloserve-slice, sloserve-edf (the SLO extension in the body; vLLM ignores it).

Writes benchmarks/results/vllm_compare.json with "ratios" (each sloserve / vLLM of that
run): offline_throughput, decode_step_b1/_b64/_b256 (step times: lower is better),
server_tpot_p50 (at 60 req/s), slo_capacity_longbench (highest rate at >= 90% attainment,
sloserve's best policy over vLLM's best of default and priority).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, stop_server  # noqa: E402

from sloserve.bench.client import ClientConfig, run_requests, wait_until_healthy  # noqa: E402
from sloserve.workload import spec as workload  # noqa: E402
from sloserve.workload.metrics import summarize  # noqa: E402

TOOLS = Path(".whl/vllm")
MODEL_DIR = "/tmp/llama3-8b-dummy"
SERVED = "llama3-8b-dummy"
PORT = 8000
LOADS = ((20.0, 200), (60.0, 300))  # (requests per second, requests)
SLO_WORKLOAD, SLO_SECONDS, SLO_GRACE_S, SLO_TARGET = "longprompt", 60.0, 20.0, 0.9
MAX_MODEL_LEN = 32768  # LongBench-like prompts reach 29k tokens: Llama-3.1's rope, same shape


def offline(out: Path) -> dict:
    result = {}
    for engine, cmd, limit in (
            ("vllm", [str(TOOLS / "bench_vllm.py"), MODEL_DIR], 330),
            ("sloserve", [str(TOOLS / "bench_sloserve.py")], 240)):
        path = out / f"offline_{engine}.json"
        subprocess.run([sys.executable, *cmd, str(path)], check=True, timeout=limit)
        data = json.loads(path.read_text())
        result[engine] = {"output_tok_per_s": data["throughput"]["output_tokens_per_s"],
                          "decode_step_ms": {str(r["batch"]): r["step_ms"]
                                             for r in data["decode"]}}
    return result


def server_commands() -> dict[str, list[str]]:
    py = sys.executable
    sloserve = [py, "-m", "sloserve.cli", "serve", "--model", "dummy:llama-3-8b",
                "--dtype", "bfloat16", "--gpu-memory-utilization", "0.9",
                "--max-num-seqs", "512", "--max-num-batched-tokens", "8192",
                "--port", str(PORT), "--served-model-name", SERVED]
    vllm = [py, "-m", "vllm.entrypoints.cli.main", "serve", MODEL_DIR, "--load-format",
            "dummy", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.9", "--port",
            str(PORT), "--served-model-name", SERVED, "--disable-uvicorn-access-log"]
    return {"sloserve": sloserve, "vllm": vllm}


def slo_server_command(name: str) -> list[str]:
    """The server command of one SLO engine, for long prompts: a 32k context on both."""
    cmds = server_commands()
    if name.startswith("sloserve-"):
        cmd = cmds["sloserve"] + ["--max-model-len", str(MAX_MODEL_LEN),
                                  "--policy", name.removeprefix("sloserve-")]
        cmd[cmd.index("dummy:llama-3-8b")] = "dummy:llama-3.1-8b"
        return cmd
    cmd = cmds["vllm"] + ["--max-model-len", str(MAX_MODEL_LEN)]
    cmd[cmd.index(MODEL_DIR)] = long_context_model()
    return cmd + (["--scheduling-policy", "priority"] if name == "vllm-priority" else [])


def long_context_model() -> str:
    """The dummy Llama-3-8B folder with Llama-3.1's rope scaling and 128k positions."""
    folder = Path(MODEL_DIR + "-128k")
    if not folder.exists():
        subprocess.run(["cp", "-r", MODEL_DIR, str(folder)], check=True)
        config = json.loads((folder / "config.json").read_text())
        config.update(max_position_embeddings=131072, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return str(folder)


def slo_sweep(name: str, cmd: list[str], out: Path, rates: list[float]) -> dict:
    """Rates ascending, one 60-s Poisson run each, until attainment falls below the target."""
    spec = workload.load(SLO_WORKLOAD)
    priority = {c.name: 0 if c.slo.realtime else i + 1 for i, c in enumerate(spec.classes)}
    config = ClientConfig(f"http://127.0.0.1:{PORT}", model=SERVED, ignore_eos=True,
                          send_slo=name.startswith("sloserve"),
                          class_priority=priority if name == "vllm-priority" else None)
    runs = {}

    def load(result: dict) -> None:
        for rate in rates:
            requests = workload.build(spec, int(rate * SLO_SECONDS), seed=0, with_text=False,
                                      rate=rate)
            ids = random.Random(0)
            for r in requests:  # ids every tokenizer in play covers
                r.extra["tokens"] = [ids.randrange(1000, 40000) for _ in range(r.prompt_len)]
            cutoff = requests[-1].arrival + SLO_GRACE_S
            records, duration = asyncio.run(run_requests(
                dataclasses.replace(config, cutoff_s=cutoff), requests))
            s = summarize(records, duration)
            runs[f"{rate:g}"] = {
                "num_requests": len(records), "slo_attainment": round(s["slo_attainment"], 4),
                "goodput": round(s["goodput"], 3),
                "per_class": {c: round(v["slo_attainment"], 4)
                              for c, v in s["per_class"].items()},
                "failed": s["failed"], "ttft_p90_ms": s["ttft_ms"]["p90"],
                "tpot_p90_ms": s["tpot_ms"]["p90"],
                "errors": collections.Counter(r.error[:60] for r in records
                                              if r.error).most_common(3)}
            print(name, rate, json.dumps(runs[f"{rate:g}"]), flush=True)
            (out / f"slo_{name}.json").write_text(json.dumps(runs, indent=1))
            if s["slo_attainment"] < SLO_TARGET:
                break
        result["runs"] = runs
        result["capacity_req_s"] = max((float(r) for r, v in runs.items()
                                        if v["slo_attainment"] >= SLO_TARGET), default=0.0)
        result["capacity_is_lower_bound"] = all(
            v["slo_attainment"] >= SLO_TARGET for v in runs.values())

    return serve_and_load(name, cmd, out, loads=(), run=load)


def serve_and_load(name: str, cmd: list[str], out: Path, loads=LOADS, env: dict = {},
                   run=None) -> dict:
    log = open(out / f"{name}_server.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **env})
    try:
        wait_until_healthy(f"http://127.0.0.1:{PORT}", proc, 240)
        result = {"start_to_health_s": round(time.perf_counter() - start, 1)}
        first = time.perf_counter()
        httpx.post(f"http://127.0.0.1:{PORT}/v1/completions", timeout=60, json={
            "model": SERVED, "prompt": [11, 12, 13], "max_tokens": 8, "ignore_eos": True})
        result["first_request_s"] = round(time.perf_counter() - first, 3)
        for rate, n in loads:
            path = out / f"load_{name}_{rate:g}.json"
            subprocess.run([sys.executable, str(TOOLS / "openai_load.py"), "--model", SERVED,
                            "--num-requests", str(n), "--rate", str(rate), "--out", str(path)],
                           check=True, timeout=300, stdout=subprocess.DEVNULL)
            result[f"rate_{rate:g}"] = json.loads(path.read_text())["all"]
            print(name, rate, json.dumps(result[f"rate_{rate:g}"]), flush=True)
        if run is not None:
            run(result)
        return result
    finally:
        stop_server(proc)


def ratios(parts: dict) -> dict:
    r = {}
    if "offline" in parts:
        sl, vl = parts["offline"]["sloserve"], parts["offline"]["vllm"]
        r["offline_throughput"] = round(sl["output_tok_per_s"] / vl["output_tok_per_s"], 3)
        for b in ("1", "64", "256"):
            r[f"decode_step_b{b}"] = round(sl["decode_step_ms"][b] / vl["decode_step_ms"][b], 3)
    if "server" in parts:
        sl, vl = (parts["server"][e]["rate_60"]["tpot_ms"]["p50"] for e in ("sloserve", "vllm"))
        r["server_tpot_p50"] = round(sl / vl, 3)
    slo = parts.get("slo_longprompt", {})
    ours = [v["capacity_req_s"] for k, v in slo.items() if k.startswith("sloserve")]
    theirs = [v["capacity_req_s"] for k, v in slo.items() if k.startswith("vllm")]
    if ours and theirs and max(theirs) > 0:
        r["slo_capacity_longbench"] = round(max(ours) / max(theirs), 3)
    return r


def attention_backend() -> str:
    """The attention backend sloserve's `auto` picks here (FA3 where vLLM is unpacked)."""
    import torch

    from sloserve.model.attention import backend_class

    return backend_class("auto", "cuda", torch.bfloat16).__name__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="offline,server")
    ap.add_argument("--scratch", default="/tmp/vllm_compare", help="logs and raw results")
    ap.add_argument("--slo-engines", default="vllm,vllm-priority,sloserve-slice")
    ap.add_argument("--slo-rates", default="1.5,2.5,3.5", help="req/s, tried ascending")
    ap.add_argument("--profile-engine", action="store_true",
                    help="cProfile sloserve's engine process during the server part")
    args = ap.parse_args()
    out = Path(args.scratch)
    out.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "vllm_compare.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    parts = record.get("parts", {})
    commands = record.get("commands", {})
    command = "python " + " ".join(sys.argv)
    stamp = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
             "sloserve_attention": attention_backend(), "device": machine()}
    for part in args.parts.split(","):
        if part == "offline":
            parts["offline"] = offline(out)
        elif part == "server":
            cmds = server_commands()
            parts["server"] = {name: serve_and_load(name, cmd, out)
                               for name, cmd in cmds.items()}
            if args.profile_engine:  # a run of its own: cProfile slows the engine
                profile = out / "engine.prof"
                serve_and_load("sloserve_profiled", cmds["sloserve"], out, LOADS[1:],
                               {"SLOSERVE_ENGINE_PROFILE": str(profile)})
                _print_profile(profile)
        elif part == "slo":
            rates = sorted(float(x) for x in args.slo_rates.split(","))
            slo = parts.setdefault("slo_longprompt", {})
            for name in args.slo_engines.split(","):
                slo[name] = slo_sweep(name, slo_server_command(name), out, rates)
                commands[f"slo {name}"] = stamp
            continue
        else:
            raise SystemExit(f"unknown part {part!r}")
        commands[part] = stamp
    import vllm

    record = {"device": machine(), "vllm_version": vllm.__version__, "commands": commands,
              "parts": parts, "ratios": ratios(parts)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["ratios"]))


def _print_profile(path: Path) -> None:
    import pstats

    if path.exists():
        pstats.Stats(str(path)).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
