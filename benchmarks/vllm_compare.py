"""sloserve vs vLLM on one GPU, one engine after the other in one device call.

Needs the GPU machine and `.whl/vllm` built by ../shared/tools/vllm-h100/build.sh (carried;
unpacked to /tmp/site with PYTHONPATH=/tmp/site:$PWD, as that folder's README says).
Llama-3-8B shape, dummy weights, bf16, both engines.

Parts (`--parts`, each fits one device call; a later run merges its parts into the file):
- offline: the folder's bench_vllm.py and bench_sloserve.py: 1,000 x (512 in / 256 out)
  output tok/s, and the decode step at batch 1 / 64 / 256 (context 1,024);
- server: both OpenAI servers, the folder's openai_load.py (streamed /v1/completions,
  512 in / 128 out, EOS ignored) at 20 req/s (200 requests) and 60 req/s (300 requests).

Writes benchmarks/results/vllm_compare.json with "ratios" (each sloserve / vLLM of that
run): offline_throughput, decode_step_b1/_b64/_b256 (step times: lower is better),
server_tpot_p50 (at 60 req/s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, stop_server  # noqa: E402

from sloserve.bench.client import wait_until_healthy  # noqa: E402

TOOLS = Path(".whl/vllm")
MODEL_DIR = "/tmp/llama3-8b-dummy"
SERVED = "llama3-8b-dummy"
PORT = 8000
LOADS = ((20.0, 200), (60.0, 300))  # (requests per second, requests)


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


def serve_and_load(name: str, cmd: list[str], out: Path, loads=LOADS, env: dict = {}
                   ) -> dict:
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
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="offline,server")
    ap.add_argument("--scratch", default="/tmp/vllm_compare", help="logs and raw results")
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
        else:
            raise SystemExit(f"unknown part {part!r}")
        commands[part] = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M")}
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
