"""Helpers for benchmark scripts: the machine's name and where results go."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        return f"CPU x{os.cpu_count()} ({cpu_model()}), torch {torch.__version__}"
    except ImportError:
        return f"CPU x{os.cpu_count()} ({platform.machine()})"


def cpu_model() -> str:
    """The CPU's name and its widest vector extension: results differ with AVX-512."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{platform.machine()}, {name}, {vector}"


def save(name: str, result: dict) -> Path:
    """Write a result file that names the machine and the command that made it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "command": "python " + " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M"), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM (the server drains), then SIGKILL after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (a server and its engine process)."""
    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)],
                         capture_output=True, text=True).stdout
    return sum(int(x) for x in out.split()) / 1024
