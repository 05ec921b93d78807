"""The benchmark client against a stub server with known token timing, and end to end."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from sloserve.bench.client import ClientConfig, run_requests
from sloserve.request import SLO
from sloserve.workload.metrics import summarize
from sloserve.workload.spec import RequestSpec
from tests.server.conftest import ServerProcess, free_port

# prompt -> (seconds to the first token, seconds between tokens); each reply has 5 tokens
TIMING = {"fast": (0.10, 0.02), "slow": (0.30, 0.08)}


def stub_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        first, gap = TIMING[body["prompt"]]

        async def events():
            await asyncio.sleep(first)
            for i in range(5):
                if i:
                    await asyncio.sleep(gap)
                chunk = {"choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub_url():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stub_app(), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True


def test_metrics_come_out_as_constructed(stub_url):
    slo = SLO(ttft_ms=200, tpot_ms=50)
    specs = [RequestSpec(i, 1, 5, "rt" if i % 2 == 0 else "bg", slo, arrival=0.1 * i,
                         text="fast" if i % 2 == 0 else "slow") for i in range(6)]
    records, duration = asyncio.run(run_requests(ClientConfig(stub_url), specs))
    for r in records:
        first, gap = TIMING["fast" if r.slo_class == "rt" else "slow"]
        assert r.ttft_ms == pytest.approx(first * 1e3, abs=25)
        assert r.tpot_ms == pytest.approx(gap * 1e3, abs=10)
        assert len(r.itl_ms) == 4 and all(x == pytest.approx(gap * 1e3, abs=15) for x in r.itl_ms)
        assert r.e2e_ms == pytest.approx((first + 4 * gap) * 1e3, abs=40)
        assert r.output_tokens == 5 and r.attained == (r.slo_class == "rt")
    summary = summarize(records, duration)
    assert summary["slo_attainment"] == 0.5
    assert summary["per_class"]["rt"]["slo_attainment"] == 1.0
    assert summary["per_class"]["bg"]["slo_attainment"] == 0.0
    assert summary["goodput"] == pytest.approx(3 / duration)
    assert duration == pytest.approx(0.5 + 0.3 + 4 * 0.08, abs=0.1)  # last send + its reply


def sloserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sloserve.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_sweep_against_a_real_server_writes_results_and_plots(tmp_path):
    server = ServerProcess("--model", "dummy:qwen2-tiny")
    try:
        runs = []
        for label in ("first", "second"):
            out = tmp_path / label
            done = sloserve("bench", "--base-url", server.url, "--workload", "vicuna",
                            "--num-requests", "6", "--sweep-rates", "4,8", "--ignore-eos",
                            "--out", str(out), "--label", label)
            assert done.returncode == 0, done.stderr
            runs.append(out)
        summary = json.loads((runs[0] / "summary.json").read_text())
        assert set(summary["rates"]) == {"4", "8"}
        assert summary["rates"]["4"]["completed"] == 6
        assert (runs[0] / "rate-4" / "requests.csv").exists()
        assert summary["rates"]["4"]["queue_ms"]["mean"] is not None  # the server's own
        for name in ("attainment_vs_rate.png", "latency_bars.png", "latency_cdf.png",
                     "queue_p90.png"):
            assert (runs[0] / name).stat().st_size > 10_000
        compared = sloserve("bench", "compare", *map(str, runs), "--out", str(tmp_path / "cmp"))
        assert compared.returncode == 0, compared.stderr
        assert "first" in compared.stdout and "second" in compared.stdout
        assert (tmp_path / "cmp" / "latency_cdf.png").exists()
    finally:
        server.stop()


@pytest.mark.parametrize("args, words", [
    (["--workload", "nope"], "unknown workload"),
    (["--request-rate", "0"], "rates must be > 0"),
    (["--base-url", "http://127.0.0.1:9"], "cannot reach"),
])
def test_bad_input_is_one_line_and_exit_2(args, words):
    done = sloserve("bench", "--base-url", "http://127.0.0.1:9", *args)
    assert done.returncode == 2
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1
