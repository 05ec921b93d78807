"""What grammar-constrained decoding costs per token (issue: first contact, structured output).

Starts `sloserve serve` (int4 by default) on loopback, then alternates rounds of C concurrent
streamed chat requests (default 8), each decoding exactly --tokens tokens: unconstrained, and
constrained by a JSON schema whose one string field is too long to finish within them (so
both kinds decode the same number of tokens). TPOT of a request = (last token - first token)
/ (tokens - 1). Prints the median TPOT of each kind over all rounds and their ratio, and
writes benchmarks/results/structured_cost.json with "ratios": {"constrained_tpot_over_free"}:

    python benchmarks/structured_cost.py [--concurrency 8] [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, stop_server  # noqa: E402

from sloserve.bench.client import wait_until_healthy  # noqa: E402

PORT = 8433
CHAT = f"http://127.0.0.1:{PORT}/v1/chat/completions"
SCHEMA = {"type": "object", "required": ["story"],
          "properties": {"story": {"type": "string", "minLength": 4000}}}
TOPICS = ["a lighthouse", "a red fox", "the moon", "a lost key", "a city bus", "an old map",
          "a storm", "a violin", "a garden", "a robot", "a river", "a train station"]


async def one_request(http: httpx.AsyncClient, i: int, tokens: int, constrained: bool
                      ) -> float:
    body = {"messages": [{"role": "user", "content": f"Tell a story about {TOPICS[i % 12]}."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": not constrained,
            "stream": True, "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "story", "schema": SCHEMA}}
    first = last = None
    used = 0
    async with http.stream("POST", CHAT, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    if used != tokens:
        raise RuntimeError(f"a request decoded {used} tokens, not {tokens}")
    return (last - first) / (tokens - 1)


async def measure(args) -> dict:
    tpots: dict[str, list[float]] = {"free": [], "constrained": []}
    async with httpx.AsyncClient(timeout=600) as http:
        await one_request(http, 0, args.tokens, True)  # warm: the grammar engine's tables
        for _ in range(args.rounds):
            for kind in tpots:
                tpots[kind] += await asyncio.gather(*(
                    one_request(http, i, args.tokens, kind == "constrained")
                    for i in range(args.concurrency)))
    return {kind: {"median_ms": round(statistics.median(v) * 1e3, 2),
                   "min_ms": round(min(v) * 1e3, 2), "max_ms": round(max(v) * 1e3, 2)}
            for kind, v in tpots.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quantization", default="int4")
    args = parser.parse_args()
    proc = subprocess.Popen([sys.executable, "-m", "sloserve.cli", "serve", "--port", str(PORT),
                             "--quantization", args.quantization],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(f"http://127.0.0.1:{PORT}", proc, 300)
        tpot = asyncio.run(measure(args))
    finally:
        stop_server(proc)
    ratio = round(tpot["constrained"]["median_ms"] / tpot["free"]["median_ms"], 3)
    for kind, t in tpot.items():
        print(f"{kind:12s} TPOT median {t['median_ms']} ms (min {t['min_ms']}, max "
              f"{t['max_ms']}) over {args.rounds} rounds of {args.concurrency}")
    print(f"constrained / free TPOT: {ratio} (bar: <= 1.10)")
    path = save("structured_cost", {
        "concurrency": args.concurrency, "rounds": args.rounds, "tokens": args.tokens,
        "quantization": args.quantization, "tpot": tpot,
        "ratios": {"constrained_tpot_over_free": ratio}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
