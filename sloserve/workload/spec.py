"""Workload files (YAML or JSON): where prompts come from, output caps, SLO classes and mix.

Shipped ones live in workloads/ and are named without extension (`--workload edge`).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from sloserve.request import SLO
from sloserve.workload import datasets
from sloserve.workload.arrivals import arrival_times, scaled_trace_times

SHIPPED = Path(__file__).parent / "workloads"


@dataclass(frozen=True)
class SLOClass:
    name: str
    share: float
    slo: SLO


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    dataset: str  # a text set, a trace, "synthetic", or "file" (the user's own)
    classes: tuple[SLOClass, ...]
    file: str | None = None  # dataset "file": JSONL / JSON / CSV, relative to the workload
    columns: dict = field(default_factory=dict)  # ours -> the file's (datasets.FILE_COLUMNS)
    suffix: str = ""  # appended to text prompts, e.g. " Answer in under 60 words."
    max_tokens: int = 256  # output cap for text prompts
    max_input_tokens: int | None = None  # longer text prompts are skipped; traces clipped
    input_len: int = 512  # synthetic
    output_len: int = 128  # synthetic
    chat: bool = False  # send as chat messages rather than plain completions

    def scaled(self, factor: float) -> WorkloadSpec:
        """Every objective x factor (for hardware slower than the SLOs assume)."""
        def scale(slo: SLO) -> SLO:
            return dataclasses.replace(slo, **{k: getattr(slo, k) * factor for k in
                                               ("ttft_ms", "tpot_ms", "deadline_ms")
                                               if getattr(slo, k) is not None})
        if factor == 1:
            return self
        return dataclasses.replace(self, classes=tuple(
            dataclasses.replace(c, slo=scale(c.slo)) for c in self.classes))

    @property
    def is_trace(self) -> bool:
        """Lengths (and maybe timestamps) rather than prompt texts."""
        if self.dataset == "file":
            return "prompt" not in self.columns
        return self.dataset in datasets.TRACES

    def file_dataset(self) -> tuple[tuple[str, ...], tuple[datasets.TraceRow, ...]]:
        return datasets.file_dataset(Path(self.file), self.columns)


@dataclass
class RequestSpec:
    index: int
    prompt_len: int
    max_tokens: int
    slo_class: str
    slo: SLO
    arrival: float = 0.0  # seconds after the run starts
    text: str | None = None  # None when only lengths are needed (the simulator)
    chat: bool = False
    extra: dict = field(default_factory=dict)


def available() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def load(name_or_path: str) -> WorkloadSpec:
    path = Path(name_or_path)
    if not path.exists():
        path = SHIPPED / f"{name_or_path}.yaml"
    if not path.exists():
        raise ValueError(f"unknown workload {name_or_path!r}: not a file, nor one of "
                         f"{', '.join(available())}")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    return parse(data, source=str(path))


def parse(data: dict, source: str = "") -> WorkloadSpec:
    try:
        classes = tuple(SLOClass(c["name"], float(c.get("share", 1.0)), SLO(**c.get("slo", {})))
                        for c in data.pop("classes", [{"name": "default"}]))
        if data.get("file") is not None:  # relative to the workload file, as users write it
            data["file"] = str(Path(source).parent / data["file"]) if source else data["file"]
        spec = WorkloadSpec(classes=classes, **data)
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"workload {source}: {e}") from None
    if spec.dataset not in (*datasets.TEXT_SETS, *datasets.TRACES, "synthetic", "file"):
        raise ValueError(f"workload {source}: unknown dataset {spec.dataset!r}")
    if (spec.dataset == "file") != (spec.file is not None):
        raise ValueError(f"workload {source}: a 'file' goes with dataset: file, and back")
    if spec.file is not None:
        try:
            spec.file_dataset()  # a bad file or column is reported now, not mid-run
        except ValueError as e:
            raise ValueError(f"workload {source}: {e}") from None
    if not classes or sum(c.share for c in classes) <= 0:
        raise ValueError(f"workload {source}: classes need positive shares")
    return spec


def build(spec: WorkloadSpec, num_requests: int, seed: int = 0, with_text: bool = True,
          rate: float | None = None, burstiness: float = 1.0, interval: float | None = None,
          time_scale: float | None = None) -> list[RequestSpec]:
    """Requests with prompts, caps, SLO classes and arrival offsets. `time_scale` replays a
    trace's own timestamps; otherwise rate / burstiness / interval pick the process."""
    rng = random.Random(seed)
    requests = _requests(spec, num_requests, rng, with_text)
    if time_scale is not None:
        if not spec.is_trace or spec.dataset == "longbench":
            raise ValueError(f"workload {spec.name} has no timestamps to replay")
        times = scaled_trace_times([r.extra.pop("timestamp") for r in requests], time_scale)
    else:
        times = arrival_times(len(requests), rate, burstiness, interval, seed)
    weights = [c.share for c in spec.classes]
    for request, t in zip(requests, times):
        cls = rng.choices(spec.classes, weights)[0]
        request.arrival, request.slo_class, request.slo = t, cls.name, cls.slo
    return requests


def _requests(spec: WorkloadSpec, n: int, rng: random.Random, with_text: bool
              ) -> list[RequestSpec]:
    def make(i: int, length: int, out: int, text: str | None, **extra) -> RequestSpec:
        return RequestSpec(i, length, max(1, out), "", SLO(), text=text, chat=spec.chat,
                           extra=extra)

    if spec.dataset == "synthetic":
        return [make(i, spec.input_len, spec.output_len,
                     datasets.synthetic_prompt(spec.input_len, rng) if with_text else None)
                for i in range(n)]
    if spec.is_trace:
        trace = spec.file_dataset()[1] if spec.file else datasets.trace(spec.dataset)
        rows = _cycled(trace, n)
        cap = spec.max_input_tokens or 10**9
        return [make(i, min(r.input_len, cap), r.output_len,
                     datasets.synthetic_prompt(min(r.input_len, cap), rng) if with_text else None,
                     timestamp=t, hash_ids=r.hash_ids) for i, (t, r) in enumerate(rows)]
    return _text_requests(spec, n, rng)


def _cycled(rows: tuple, n: int) -> list[tuple[float, object]]:
    """The first n rows with their timestamps; a trace shorter than n repeats, later laps
    starting where the previous one ended."""
    span = rows[-1].timestamp - rows[0].timestamp + 1.0 if rows else 0.0
    return [(rows[i % len(rows)].timestamp + span * (i // len(rows)), rows[i % len(rows)])
            for i in range(n)]


def _text_requests(spec: WorkloadSpec, n: int, rng: random.Random) -> list[RequestSpec]:
    if spec.file:  # the user's prompts, with their own output caps where the file has them
        texts, caps = spec.file_dataset()
        pool = [(t, c.output_len if caps else spec.max_tokens) for t, c in
                zip(texts, caps or texts)]
    else:
        pool = [(t, spec.max_tokens) for t in datasets.text_prompts(spec.dataset)]
    rng.shuffle(pool)
    out, cap = [], spec.max_input_tokens or 10**9
    for text, max_tokens in pool:
        prompt = text + spec.suffix
        length = datasets.count_tokens(prompt)
        if length <= cap:
            out.append(RequestSpec(len(out), length, max(1, max_tokens), "", SLO(),
                                   text=prompt, chat=spec.chat))
        if len(out) == n:
            return out
    if not out:
        raise ValueError(f"workload {spec.name}: no prompt fits max_input_tokens")
    base = len(out)
    while len(out) < n:  # a small set is reused in the same shuffled order
        again = out[len(out) % base]
        out.append(RequestSpec(len(out), again.prompt_len, again.max_tokens, "", SLO(),
                               text=again.text, chat=spec.chat))
    return out
