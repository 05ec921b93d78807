"""Per-model generation defaults, as vLLM's `--generation-config`: what a request that sends
no temperature / top_p / top_k / repetition_penalty samples with. OpenAI's own defaults
(temperature 1, top_p 1) make a small model ramble past any EOS; model authors publish
better ones."""

from __future__ import annotations

import json
from pathlib import Path

from sloserve.model.loader import resolve

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
SHIPPED = Path(__file__).parent / "generation"  # for models whose files carry none (GGUF)


def generation_defaults(choice: str, model: str | None) -> dict[str, float]:
    """choice "auto": the model folder's generation_config.json, else the one shipped for
    the model; "none": none (OpenAI's defaults apply); else a JSON file's path."""
    if choice == "none":
        return {}
    if choice != "auto":
        return _read(Path(choice))
    name, folder, _ = resolve(model)
    own = folder / "generation_config.json" if folder is not None else None
    for path in (own, SHIPPED / f"{name}.json"):
        if path is not None and path.is_file():
            return _read(path)
    return {}


def _read(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--generation-config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--generation-config {path}: expected a JSON object")
    return {key: data[key] for key in SAMPLING_KEYS if data.get(key) is not None}
