"""The server under careless and hostile clients at volume (issue: proof under abuse).

Starts `sloserve serve` (int4, --max-waiting 256) on loopback and runs, one after the other:
- bad input: malformed JSON, wrong types, huge n / max_tokens / top_logprobs, a negative
  temperature, invalid UTF-8, a 10 MB prompt, a prompt of 1 million token ids: each must be
  a 4xx within 1 s, and the server's peak RSS during them under 1.5x its idle RSS;
- flood: N requests at once on N connections (default 2,000), each a short chat reply: every
  one must end with a reply, or a 429 / 503 carrying Retry-After; none lost, none hanging
  (each has 300 s);
- storm: M streaming clients (default 300) that close their stream after a random number of
  chunks (0-20); then `kv_cache_usage_perc` must return to 0 and the next request must be
  served normally.
Prints the counts, the server's peak RSS, and writes benchmarks/results/abuse.json:

    python benchmarks/abuse.py [--flood 2000] [--storm 300]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import process_tree_rss_mb, save, stop_server  # noqa: E402

from sloserve.bench.client import wait_until_healthy  # noqa: E402

PORT = 8431
URL = f"http://127.0.0.1:{PORT}"
CHAT = f"{URL}/v1/chat/completions"


def body(i: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": f"Say hello to number {i}."}],
            "max_tokens": 8, "temperature": 0, **extra}


async def flood(n: int) -> dict:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        async def one(i: int) -> str:
            try:
                r = await http.post(CHAT, json=body(i))
            except httpx.HTTPError as e:
                return f"lost: {e.__class__.__name__}"
            if r.status_code == 200:
                return "200" if r.json()["choices"][0]["message"]["content"] else "200 empty"
            if r.status_code in (429, 503):
                return f"{r.status_code}" + ("" if "retry-after" in r.headers
                                             else " without Retry-After")
            return f"{r.status_code} (unexpected)"

        started = time.monotonic()
        outcomes = await asyncio.gather(*(one(i) for i in range(n)))
    return {"requests": n, "seconds": round(time.monotonic() - started, 1),
            "outcomes": dict(collections.Counter(outcomes))}


async def storm(m: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        async def one(i: int) -> str:
            leave_after = rng.randrange(0, 21)
            try:
                async with http.stream("POST", CHAT, json=body(
                        i, max_tokens=64, stream=True, ignore_eos=True)) as r:
                    if r.status_code != 200:
                        return str(r.status_code)
                    chunks = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            chunks += 1
                            if chunks > leave_after:
                                return "left mid-stream"
                    return "finished"
            except httpx.HTTPError as e:
                return f"lost: {e.__class__.__name__}"

        outcomes = await asyncio.gather(*(one(i) for i in range(m)))
    usage = settled_kv_usage()
    after = httpx.post(CHAT, json=body(0), timeout=60)
    return {"clients": m, "outcomes": dict(collections.Counter(outcomes)),
            "kv_cache_usage_after": usage, "next_request_status": after.status_code}


def settled_kv_usage(timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        usage = metric("kv_cache_usage_perc")
        if usage == 0 or time.monotonic() > deadline:
            return usage
        time.sleep(0.2)


def metric(name: str) -> float:
    for line in httpx.get(f"{URL}/metrics").text.splitlines():
        if line.startswith(f"sloserve:{name}"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


class PeakRSS(threading.Thread):
    """The server's process tree's resident memory, sampled every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.running = pid, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak_mb = max(self.peak_mb, process_tree_rss_mb(self.pid))
            time.sleep(0.2)


COMPLETIONS = f"{URL}/v1/completions"
HI = [{"role": "user", "content": "hi"}]
BAD_INPUTS = {  # name -> (url, JSON body or raw bytes)
    "malformed JSON": (CHAT, b'{"messages": ['),
    "wrong type": (CHAT, {"messages": "hi"}),
    "n = 10^9": (CHAT, {"messages": HI, "n": 10**9}),
    "max_tokens = 10^18": (CHAT, {"messages": HI, "max_tokens": 10**18}),
    "top_logprobs = 10^6": (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 10**6}),
    "temperature = -5": (CHAT, {"messages": HI, "temperature": -5}),
    "invalid UTF-8": (CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    "10 MB prompt": (CHAT, {"messages": [{"role": "user", "content": "x" * 10**7}]}),
    "1 million token ids": (COMPLETIONS, {"prompt": [5] * 10**6, "max_tokens": 4}),
}


def bad_inputs() -> dict:
    answers = {}
    with httpx.Client(timeout=30) as http:
        for name, (url, payload) in BAD_INPUTS.items():
            started = time.monotonic()
            if isinstance(payload, bytes):
                r = http.post(url, content=payload, headers={"Content-Type": "application/json"})
            else:
                r = http.post(url, json=payload)
            answers[name] = {"status": r.status_code,
                             "seconds": round(time.monotonic() - started, 3),
                             "error": r.json()["error"]["message"][:80]}
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flood", type=int, default=2000)
    ap.add_argument("--storm", type=int, default=300)
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "sloserve.cli", "serve", "--port", str(PORT),
           "--quantization", "int4", "--max-waiting", "256", "--log-stats-interval-s", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rss = PeakRSS(proc.pid)
    try:
        wait_until_healthy(URL, proc, 180)
        rss.start()
        time.sleep(1)
        idle_mb = rss.peak_mb
        result = {"server": " ".join(cmd[2:]), "bad_inputs": bad_inputs()}
        time.sleep(0.5)
        result["bad_inputs_peak_rss_over_idle"] = round(rss.peak_mb / idle_mb, 3)
        print("bad inputs", result["bad_inputs"], result["bad_inputs_peak_rss_over_idle"],
              flush=True)
        result["flood"] = asyncio.run(flood(args.flood))
        print("flood", result["flood"], flush=True)
        result["storm"] = asyncio.run(storm(args.storm))
        print("storm", result["storm"], flush=True)
        result["rss_mb"] = {"idle": round(idle_mb), "peak": round(rss.peak_mb)}
        result["server_alive"] = proc.poll() is None
    finally:
        rss.running = False
        stop_server(proc)
    print("RSS", result["rss_mb"], f"-> {save('abuse', result)}")


if __name__ == "__main__":
    main()
