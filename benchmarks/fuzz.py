"""The HTTP API fuzzed at volume from its own OpenAPI schema (issue: proof under abuse).

The suite's tests/server/test_fuzz.py runs 25 cases per operation; this runs --cases per
operation and mode (bodies that fit the schema, and bodies that break it) against
`sloserve serve --quantization int4 --max-model-len 48 --request-timeout 3` and counts every
request sent, the 5xx replies, the hangs (no reply within 30 s), and the errors not in
OpenAI's shape. Writes benchmarks/results/fuzz.json:

    python benchmarks/fuzz.py [--cases 600]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import save  # noqa: E402

from tests.server.conftest import ServerProcess  # noqa: E402

KEY = "fuzz-key"


def fuzz(operation, mode: GenerationMode, url: str, cases: int, tally: collections.Counter,
         slowest: list[float], hangs: list[str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=cases, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    def one(case) -> None:
        started = time.monotonic()
        try:
            response = case.call(base_url=url, timeout=30,
                                 headers={"Authorization": f"Bearer {KEY}"})
        except Exception as e:  # schemathesis sends with requests: its ReadTimeout
            if "Timeout" not in type(e).__name__:
                raise
            tally["hang"] += 1
            hangs.append(f"{case.method} {case.path} {case.body!r:.300}")
            return
        slowest[0] = max(slowest[0], time.monotonic() - started)
        tally["requests"] += 1
        tally[f"{response.status_code // 100}xx"] += 1
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                shaped = bool(error["message"] and error["type"])
            except (ValueError, KeyError, TypeError):
                shaped = False
            tally["error not in OpenAI's shape"] += not shaped

    try:
        one()
    except Unsatisfiable:  # an operation that takes no input has no invalid input
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=600)
    args = parser.parse_args()
    server = ServerProcess("--api-key", KEY, "--max-model-len", "48", "--request-timeout", "3",
                           "--quantization", "int4")
    tally: collections.Counter = collections.Counter()
    slowest, hangs = [0.0], []
    started = time.monotonic()
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        for result in schema.get_all_operations():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(result.ok(), mode, server.url, args.cases, tally, slowest, hangs)
        alive = httpx.get(f"{server.url}/health").status_code == 200 and server.proc.poll() is None
    finally:
        server.stop()
    result = {"cases_per_operation_and_mode": args.cases, "tally": dict(tally),
              "server_alive_after": alive, "hangs": hangs, "slowest_reply_s": round(slowest[0], 2),
              "minutes": round((time.monotonic() - started) / 60, 1)}
    print(result)
    print(f"-> {save('fuzz', result)}")


if __name__ == "__main__":
    main()
