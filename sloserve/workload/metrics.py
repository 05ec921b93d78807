"""Per-request records and their summary, defined as vLLM's benchmark_serving does.

TTFT: send to first token. TPOT: (last token - first token) / (output tokens - 1). ITL: gaps
between consecutive token arrivals. E2E: send to last token. A request attains its SLO when it
finished without error and meets every objective it carries; goodput counts those per second.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sloserve.request import SLO

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    slo_class: str
    send_time: float  # seconds, the run's clock
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    queue_ms: float | None = None  # as the server reports it, when it does
    prompt_tokens: int = 0
    output_tokens: int = 0
    itl_ms: list[float] = field(default_factory=list)
    error: str = ""
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_deadline_ms: float | None = None
    kv_transfer_ms: float | None = None  # disaggregated serving, when the server reports it

    @classmethod
    def start(cls, index: int, slo_class: str, slo: SLO, send_time: float) -> RequestRecord:
        return cls(index, slo_class, send_time, slo_ttft_ms=slo.ttft_ms, slo_tpot_ms=slo.tpot_ms,
                   slo_deadline_ms=slo.deadline_ms)

    def finish(self, token_times: list[float], end_time: float) -> None:
        """Fill the timings from the arrival times of the output tokens (run clock)."""
        self.output_tokens = self.output_tokens or len(token_times)
        if token_times:
            self.ttft_ms = (token_times[0] - self.send_time) * 1e3
            self.itl_ms = [(b - a) * 1e3 for a, b in zip(token_times, token_times[1:])]
        if len(token_times) > 1 and self.output_tokens > 1:
            span = token_times[-1] - token_times[0]
            self.tpot_ms = span / (self.output_tokens - 1) * 1e3
        self.e2e_ms = (end_time - self.send_time) * 1e3

    @property
    def ok(self) -> bool:
        return not self.error and self.ttft_ms is not None

    @property
    def attained(self) -> bool:
        slo = SLO(self.slo_ttft_ms, self.slo_tpot_ms, self.slo_deadline_ms)
        s = 1e-3
        return self.ok and slo.attained(self.ttft_ms * s, _scale(self.tpot_ms, s),
                                        _scale(self.e2e_ms, s))


def _scale(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ordered = sorted(values)
    out = {"mean": statistics.fmean(ordered)}
    for p in PERCENTILES:  # nearest-rank percentiles, as numpy's "lower" would differ little
        out[f"p{p}"] = ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]
    return out


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    done = [r for r in records if r.ok]
    attained = [r for r in records if r.attained]
    classes = sorted({r.slo_class for r in records})
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s if duration_s else 0.0,
        "output_throughput": sum(r.output_tokens for r in done) / duration_s if duration_s else 0.0,
        "total_token_throughput": sum(r.output_tokens + r.prompt_tokens for r in done) / duration_s
        if duration_s else 0.0,
        "ttft_ms": _stats([r.ttft_ms for r in done]),
        "tpot_ms": _stats([r.tpot_ms for r in done if r.tpot_ms is not None]),
        "itl_ms": _stats([x for r in done for x in r.itl_ms]),
        "e2e_ms": _stats([r.e2e_ms for r in done]),
        "queue_ms": _stats([r.queue_ms for r in done if r.queue_ms is not None]),
        "slo_attainment": len(attained) / len(records) if records else 0.0,
        "goodput": len(attained) / duration_s if duration_s else 0.0,
        "per_class": {c: _class_summary([r for r in records if r.slo_class == c], duration_s)
                      for c in classes},
    }


def _class_summary(records: list[RequestRecord], duration_s: float) -> dict:
    attained = sum(r.attained for r in records)
    return {"num_requests": len(records), "slo_attainment": attained / len(records),
            "goodput": attained / duration_s if duration_s else 0.0,
            "ttft_ms": _stats([r.ttft_ms for r in records if r.ok]),
            "tpot_ms": _stats([r.tpot_ms for r in records if r.tpot_ms is not None])}


CSV_FIELDS = [f.name for f in fields(RequestRecord) if f.name != "itl_ms"] + ["attained"]


def write_csv(records: list[RequestRecord], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in records:
            row = {k: v for k, v in asdict(r).items() if k != "itl_ms"}
            writer.writerow({**row, "attained": r.attained})


def read_csv(path: Path) -> list[RequestRecord]:
    def value(name: str, text: str):
        if text == "":
            return None if name not in ("error", "slo_class") else ""
        if name in ("index", "prompt_tokens", "output_tokens"):
            return int(text)
        if name in ("error", "slo_class"):
            return text
        return float(text)

    with open(path) as f:
        return [RequestRecord(**{k: value(k, v) for k, v in row.items() if k != "attained"})
                for row in csv.DictReader(f)]
