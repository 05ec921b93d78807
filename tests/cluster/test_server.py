"""`sloserve serve --mode tropical`: the same OpenAI server in front of Ray actors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import chat
from tests.server.conftest import ServerProcess

pytest.importorskip("ray")


def test_openai_client_through_prefill_and_decode_instances(llm):
    from openai import OpenAI

    server = ServerProcess("--mode", "tropical", "--replica-spec", "1,1", "1,1",
                           "--partition-id", "1", "--num-kv-blocks", "128")
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        question = "Write a haiku about the sea."
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=chat(question), max_tokens=24,
            temperature=0)
        expected = llm.generate([chat(question)], _greedy(24))[0].text
        assert reply.choices[0].message.content == expected
        timings = reply.choices[0].model_extra["timings"]
        assert timings["kv_transfer_ms"] is not None and timings["ttft_ms"] > 0
        stream = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=chat(question), max_tokens=24,
            temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    finally:
        server.stop()
    assert server.proc.returncode == 0


def _greedy(n: int):
    from sloserve import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0)


@pytest.mark.parametrize("args,words", [
    (["--replica-spec", "0,1", "1,1"], "tp must be positive"),
    (["--replica-spec", "1,2", "1,1"], "pipeline parallelism"),
    (["--replica-spec", "1,1", "1,1", "--partition-id", "2"], "--partition-id"),
])
def test_bad_layouts_get_one_line_errors(args, words):
    proc = subprocess.run([sys.executable, "-m", "sloserve.cli", "serve", "--mode", "disagg",
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and words in proc.stderr
    assert "Traceback" not in proc.stderr
