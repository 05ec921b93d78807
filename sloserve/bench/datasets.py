"""Real prompt sets shipped with the project (see data/*/LICENSE*)."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"


def vicuna_questions() -> list[str]:
    """FastChat's 80 short assistant questions (Apache-2.0)."""
    lines = (DATA / "vicuna_bench" / "question.jsonl").read_text().splitlines()
    return [json.loads(line)["turns"][0] for line in lines if line.strip()]
