"""Tropical's routing test, shared by the Ray front end and the simulator (no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeLoad:
    """What the test needs to know of one decode instance."""

    queued_prompt_tokens: int
    tpot_slack: float | None  # seconds: see tpot_slack(); None: no running TPOT objective
    last_step_time: float


def tpot_slack(running: Iterable, now: float, step_time: float) -> float | None:
    """How long the running requests' decoding can be held up (by prefills sharing their
    steps) with every one of them still meeting its TPOT objective.

    TPOT is a mean over a request's output, so a request that has decoded faster than its
    objective has banked time: objective x intervals, minus the time since its first token,
    minus its remaining tokens at `step_time` each (max_tokens: EOS is not foreseeable)."""
    slack = None
    for r in running:
        if not r.slo.tpot_ms or r.first_token_time is None:
            continue
        remaining = max(0, r.sampling_params.max_tokens - r.num_output_tokens)
        intervals = r.num_output_tokens - 1 + remaining
        if intervals <= 0:
            continue
        spare = (r.slo.tpot_ms / 1e3 * intervals - (now - r.first_token_time)
                 - remaining * step_time)
        slack = spare if slack is None else min(slack, spare)
    return slack


def decode_with_slack(prompt_tokens: int, prefill_queued: int | None,
                      decodes: Sequence[DecodeLoad], latency) -> int | None:
    """Index of the decode instance that should prefill this prompt itself, or None.

    A decode instance takes the prompt when it would produce the first token sooner than the
    best prefill instance (`prefill_queued` prompt tokens ahead of it; None: none is up) and
    its running decodes have the TPOT slack to wait out the prefills queued there and this
    one; the soonest such instance wins. Sending prompts to a decode instance only once the
    prefill instances would miss the TTFT objective kept those at the objective's edge: on
    two H200s that rule met 67% of objectives at 8 req/s of LongBench-like prompts, where two
    colocated replicas met all of them."""
    best = None
    best_ttft = None if prefill_queued is None else latency.prefill_time(
        prefill_queued + prompt_tokens)
    for index, d in enumerate(decodes):
        prefills = latency.prefill_time(d.queued_prompt_tokens + prompt_tokens)
        ttft = prefills + d.last_step_time
        tpot_ok = d.tpot_slack is None or prefills <= d.tpot_slack
        if tpot_ok and (best_ttft is None or ttft < best_ttft):
            best, best_ttft = index, ttft
    return best
