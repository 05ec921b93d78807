"""Results folders, plots and comparisons.

A run folder holds summary.json (one summary per request rate, and the highest rate whose
attainment met the target), rate-R/requests.csv, and four PNG plots. `compare` overlays any
number of run folders — measured or simulated — in the same four plots and prints a table.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

from sloserve.workload.metrics import RequestRecord, read_csv, summarize, write_csv

PLOTS = ("attainment_vs_rate.png", "latency_bars.png", "latency_cdf.png", "queue_p90.png")


@dataclass
class Run:
    label: str
    folder: Path
    summaries: dict[float, dict]  # request rate -> summary
    target: float
    meta: dict

    def records(self, rate: float) -> list[RequestRecord]:
        return read_csv(self.folder / f"rate-{rate:.10g}" / "requests.csv")

    @property
    def max_rate_meeting_target(self) -> float | None:
        ok = [r for r, s in self.summaries.items()
              if s["slo_attainment"] >= self.target and not s.get("all_at_once")]
        return max(ok) if ok else None


def save_rate(folder: Path, rate: float, records: list[RequestRecord], duration: float,
              all_at_once: bool = False) -> dict:
    """`all_at_once`: every request was sent at the start; `rate` is then only where the
    point goes on a plot, and tables label it as a burst, never as a rate."""
    sub = folder / f"rate-{rate:.10g}"
    sub.mkdir(parents=True, exist_ok=True)
    write_csv(records, sub / "requests.csv")
    return {**summarize(records, duration), "all_at_once": all_at_once}


def rate_label(rate: float, summary: dict) -> str:
    return f"{summary['num_requests']} at once" if summary.get("all_at_once") \
        else f"{rate:g} req/s"


def save_run(folder: Path, label: str, summaries: dict[float, dict], target: float,
             meta: dict) -> Run:
    run = Run(label, folder, summaries, target, meta)
    body = {"label": label, "target_attainment": target,
            "max_rate_meeting_target": run.max_rate_meeting_target,
            "machine": f"{platform.node()} ({platform.machine()})", **meta,
            "rates": {f"{r:.10g}": s for r, s in sorted(summaries.items())}}
    (folder / "summary.json").write_text(json.dumps(body, indent=2) + "\n")
    plot([run], folder)
    return run


def load_run(folder: str | Path) -> Run:
    folder = Path(folder)
    path = folder / "summary.json"
    if not path.exists():
        raise ValueError(f"{folder} is not a results folder (no summary.json)")
    body = json.loads(path.read_text())
    summaries = {float(r): s for r, s in body.pop("rates").items()}
    return Run(body.get("label", folder.name), folder, summaries,
               body.get("target_attainment", 0.9), body)


def table(runs: list[Run]) -> str:
    """One line per run and rate; the duration is the whole run's (first send to last
    token), the figure the llm-serving teams compare."""
    lines = [f"{'run':24s} {'load':>13s} {'duration':>9s} {'attain':>7s} {'goodput':>8s} "
             f"{'p90 TTFT':>9s} {'p90 TPOT':>9s} {'p90 E2E':>9s}  max rate >= target"]
    for run in runs:
        for rate, s in sorted(run.summaries.items()):
            lines.append(f"{run.label[:24]:24s} {rate_label(rate, s):>13s} "
                         f"{s['duration_s']:8.1f}s {s['slo_attainment']:7.1%} "
                         f"{s['goodput']:8.3f} {_ms(s['ttft_ms']['p90']):>9s} "
                         f"{_ms(s['tpot_ms']['p90']):>9s} {_ms(s['e2e_ms']['p90']):>9s}  "
                         f"{run.max_rate_meeting_target}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def plot(runs: list[Run], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in zip(PLOTS, (_attainment, _bars, _cdf, _queue)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, runs)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        paths.append(folder / name)
    return paths


def _attainment(ax, runs: list[Run]) -> None:
    for run in runs:
        rates = sorted(run.summaries)
        line, = ax.plot(rates, [100 * run.summaries[r]["slo_attainment"] for r in rates],
                        marker="o", label=f"{run.label} (all)")
        classes = sorted({c for s in run.summaries.values() for c in s["per_class"]})
        if len(classes) > 1:
            for c in classes:
                ax.plot(rates, [100 * run.summaries[r]["per_class"].get(c, {}).get(
                    "slo_attainment", 0) for r in rates], linestyle="--",
                    color=line.get_color(), alpha=0.6, marker=".", label=f"{run.label}: {c}")
    ax.axhline(100 * runs[0].target, color="grey", linewidth=0.8, linestyle=":")
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", ylim=(0, 105),
           title="SLO attainment vs request rate")
    ax.legend(fontsize=7)


def _bars(ax, runs: list[Run]) -> None:
    metrics = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E"))
    width = 0.8 / (2 * len(runs))
    for i, run in enumerate(runs):
        s = run.summaries[max(run.summaries)]
        for j, stat in enumerate(("mean", "p90")):
            xs = [k + (2 * i + j) * width for k in range(len(metrics))]
            ax.bar(xs, [(s[m][stat] or 0) / 1e3 for m, _ in metrics], width,
                   label=f"{run.label} {stat} (at {max(run.summaries):g} req/s)")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(metrics))], [n for _, n in metrics])
    ax.set(ylabel="latency (s)", title="Mean and p90 latency at the highest rate")
    ax.set_yscale("log")
    ax.legend(fontsize=7)


def _cdf(ax, runs: list[Run]) -> None:
    for run in runs:
        rate = max(run.summaries)
        values = sorted(r.e2e_ms / 1e3 for r in run.records(rate) if r.ok)
        if values:
            ax.plot(values, [(k + 1) / len(values) for k in range(len(values))],
                    label=f"{run.label} at {rate_label(rate, run.summaries[rate])}")
    ax.set(xlabel="end-to-end latency (s)", ylabel="fraction of requests",
           title="End-to-end latency CDF", ylim=(0, 1.02))
    ax.legend(fontsize=7)


def _queue(ax, runs: list[Run]) -> None:
    for run in runs:
        rates = sorted(run.summaries)
        ax.plot(rates, [(run.summaries[r]["queue_ms"]["p90"] or 0) / 1e3 for r in rates],
                marker="o", label=run.label)
    ax.set(xlabel="request rate (req/s)", ylabel="p90 queueing time (s)",
           title="p90 server-side queueing time")
    ax.legend(fontsize=7)
