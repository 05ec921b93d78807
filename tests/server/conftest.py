"""Real `sloserve serve` processes on loopback, driven by real clients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from sloserve.bench.client import wait_until_healthy

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sloserve.cli", "serve", "--port", str(self.port), *args]
        # its log goes to a file: a pipe nobody reads fills after ~64 KB of access log and
        # then blocks the server's logging call, and with it the HTTP event loop
        self.log = tempfile.TemporaryFile()
        # a session of its own: a test may signal the server's whole process group
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        try:
            wait_until_healthy(self.url, self.proc, timeout)
        except RuntimeError:
            if self.proc.poll() is None:
                raise
            raise RuntimeError(f"server exited:\n{self.output()}") from None

    def output(self) -> str:
        """What the server has logged so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        for line in text.splitlines():
            if line.startswith(f"sloserve:{name}{{") or line.startswith(f"sloserve:{name} "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def settled_metric(self, name: str, value: float, timeout: float = 5.0) -> float:
        """The metric once it reads `value` (an abort lands in the engine process within a
        step or two), or its last reading after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (reading := self.metric(name)) != value and time.monotonic() < deadline:
            time.sleep(0.05)
        return reading

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def server():
    srv = ServerProcess("--api-key", API_KEY, "--max-model-len", "1024")
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
