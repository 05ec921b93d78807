"""The package's import layering (scripts/check_layers.py): no import runs upward, none
circles; and the check itself catches both."""

import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "check_layers.py"


def check(root: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT)] + ([str(root)] if root else [])
    return subprocess.run(args, capture_output=True, text=True)


def test_no_import_runs_upward_or_circles():
    result = check()
    assert result.returncode == 0, result.stdout


def test_the_check_catches_an_upward_import_and_a_circle(tmp_path):
    package = tmp_path / "sloserve"
    shutil.copytree(SCRIPT.parent.parent / "sloserve", package,
                    ignore=shutil.ignore_patterns("data", "*.json", "__pycache__"))
    with open(package / "core" / "plan.py", "a") as f:  # core (torch-free) -> engine
        f.write("\ndef _late():\n    from sloserve.engine import LLMEngine  # noqa\n")
    with open(package / "request.py", "a") as f:  # request <-> interface
        f.write("\nif False:\n    from sloserve.interface import RequestOutput  # noqa\n")
    result = check(package)
    assert result.returncode == 1
    assert "upward: sloserve.core.plan (layer 1) imports sloserve.engine" in result.stdout
    assert "circle: sloserve.request -> sloserve.interface -> sloserve.request" \
        in result.stdout
