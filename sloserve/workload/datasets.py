"""Real workloads shipped with the project (each folder of data/ keeps its license).

Prompt sets give real text; traces give real lengths and arrival times, from which prompts of
the given token length are built out of the tokenizer's own vocabulary. Pure Python.
"""

from __future__ import annotations

import csv
import functools
import json
import random
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

DATA = Path(__file__).parent / "data"
TEXT_SETS = ("vicuna", "mt_bench", "dolly", "sharegpt")
TRACES = ("mooncake", "azure", "longbench")


@dataclass(frozen=True)
class TraceRow:
    timestamp: float  # seconds from the trace's start
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()  # Mooncake: one id per 512-token prefix block


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def vicuna_questions() -> list[str]:
    """FastChat's 80 short assistant questions (Apache-2.0)."""
    return [q["turns"][0] for q in _jsonl(DATA / "vicuna_bench" / "question.jsonl")]


@functools.cache
def text_prompts(name: str) -> tuple[str, ...]:
    if name == "vicuna":
        return tuple(vicuna_questions())
    if name == "mt_bench":
        return tuple(q["turns"][0] for q in _jsonl(DATA / "mt_bench" / "question.jsonl"))
    if name == "dolly":
        rows = json.loads((DATA / "dolly_2k" / "dolly_train_2000.json").read_text())
        return tuple(r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
                     for r in rows)
    if name == "sharegpt":
        rows = json.loads((DATA / "sharegpt" / "ShareGPT_V3_filtered_500.json").read_text())
        return tuple(r["conversations"][0]["value"] for r in rows if r["conversations"])
    raise ValueError(f"unknown prompt set {name!r}; choose one of {', '.join(TEXT_SETS)}")


@functools.cache
def trace(name: str) -> tuple[TraceRow, ...]:
    if name == "mooncake":
        rows = _jsonl(DATA / "mooncake" / "conversation_trace.jsonl")
        return tuple(TraceRow(r["timestamp"] / 1e3, r["input_length"], r["output_length"],
                              tuple(r["hash_ids"])) for r in rows)
    if name == "azure":
        with open(DATA / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv") as f:
            rows = list(csv.DictReader(f))
        times = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]
        return tuple(TraceRow((t - times[0]).total_seconds(), int(r["ContextTokens"]),
                              int(r["GeneratedTokens"])) for t, r in zip(times, rows))
    if name == "longbench":
        return longbench_like(1000)
    raise ValueError(f"unknown trace {name!r}; choose one of {', '.join(TRACES)}")


def longbench_tasks() -> list[tuple[str, int, int]]:
    """(task, average input words, output token cap) of LongBench's English and code tasks."""
    caps = json.loads((DATA / "longbench" / "dataset2maxlen.json").read_text())
    table = (DATA / "longbench" / "task.md").read_text().split("# Task description")[0]
    tasks = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 5 or not re.fullmatch(r"[\d,]+", cells[3]) or cells[4] == "ZH":
            continue
        key = re.sub(r"[^a-z0-9]", "", cells[0].lower())
        key = {"2wikimultihopqa": "2wikimqa"}.get(key, key)
        cap = next((v for k, v in caps.items() if re.sub(r"[^a-z0-9]", "", k) == key), 128)
        tasks.append((cells[0], int(cells[3].replace(",", "")), cap))
    return tasks


def longbench_like(n: int, seed: int = 0, tokens_per_word: float = 1.3) -> tuple[TraceRow, ...]:
    """Long-prompt requests with LongBench's per-task input lengths (+-20%) and output caps;
    no timestamps (arrivals come from the chosen arrival process)."""
    rng, tasks = random.Random(seed), longbench_tasks()
    rows = []
    for _ in range(n):
        _, words, cap = rng.choice(tasks)
        rows.append(TraceRow(0.0, int(words * tokens_per_word * rng.uniform(0.8, 1.2)), cap))
    return tuple(rows)


FILE_COLUMNS = ("prompt", "input_len", "output_len", "timestamp")


def rows_of_file(path: Path) -> list[dict]:
    """A user's dataset: JSON Lines, a JSON list of objects, or CSV with a header."""
    if not path.exists():
        raise ValueError(f"dataset file {path} does not exist")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".jsonl":
        return _jsonl(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
            return rows
        raise ValueError(f"dataset file {path}: expected a list of objects")
    raise ValueError(f"dataset file {path}: use .jsonl, .json or .csv")


def file_dataset(path: Path, columns: dict[str, str]
                 ) -> tuple[tuple[str, ...], tuple[TraceRow, ...]]:
    """(prompt texts, trace rows) of a user's dataset file; `columns` maps prompt |
    input_len | output_len | timestamp to the file's column names. A prompt column gives
    text prompts (output caps from output_len when mapped); otherwise input_len gives
    lengths, as a trace (timestamps in seconds when mapped)."""
    unknown = set(columns) - set(FILE_COLUMNS)
    if unknown:
        raise ValueError(f"columns: unknown {', '.join(sorted(unknown))}; "
                         f"map any of {', '.join(FILE_COLUMNS)}")
    if "prompt" not in columns and "input_len" not in columns:
        raise ValueError("columns: map 'prompt' (text) or 'input_len' (token counts)")
    rows = rows_of_file(path)
    if not rows:
        raise ValueError(f"dataset file {path} has no rows")
    missing = {c for c in columns.values() if c not in rows[0]}
    if missing:
        raise ValueError(f"dataset file {path} has no column {', '.join(sorted(missing))}")

    def number(row: dict, key: str, default: float = 0.0) -> float:
        try:
            return float(row[columns[key]]) if key in columns else default
        except (TypeError, ValueError):
            raise ValueError(f"dataset file {path}: {columns[key]}={row[columns[key]]!r} "
                             f"is not a number") from None

    if "prompt" in columns:
        texts = tuple(str(r[columns["prompt"]]) for r in rows)
        caps = tuple(TraceRow(0.0, 0, int(number(r, "output_len"))) for r in rows)
        return texts, caps if "output_len" in columns else ()
    return (), tuple(TraceRow(number(r, "timestamp"), int(number(r, "input_len")),
                              int(number(r, "output_len", 128))) for r in rows)


@functools.cache
def tokenizer():
    """SmolLM2's tokenizer (tokenizers library, no torch)."""
    from tokenizers import Tokenizer

    path = Path(__file__).parent.parent / "model" / "tokenizer" / "tokenizer.json"
    return Tokenizer.from_file(str(path))


@functools.lru_cache(maxsize=1 << 16)  # workloads are rebuilt per simulated rate (the tuner)
def count_tokens(text: str) -> int:
    return len(tokenizer().encode(text, add_special_tokens=False).ids)


def synthetic_prompt(num_tokens: int, rng: random.Random) -> str:
    """Text that tokenizes to about `num_tokens` tokens: real vocabulary, random order."""
    tok = tokenizer()
    vocab = tok.get_vocab_size()
    ids = [rng.randrange(1000, vocab) for _ in range(num_tokens)]
    ids = tok.encode(tok.decode(ids), add_special_tokens=False).ids[:num_tokens]
    return tok.decode(ids)
