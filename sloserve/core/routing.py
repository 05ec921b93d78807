"""Tropical's routing test, shared by the Ray front end and the simulator (no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeLoad:
    """What the test needs to know of one decode instance."""

    queued_prompt_tokens: int
    num_running: int
    min_running_tpot_slo: float | None  # seconds
    last_step_time: float


def decode_with_slack(prompt_tokens: int, ttft_slo: float | None, prefill_queued: int | None,
                      decodes: Sequence[DecodeLoad], latency) -> int | None:
    """Index of the decode instance that should prefill this prompt itself, or None.

    Only when the best prefill instance (`prefill_queued` prompt tokens ahead; None: none is
    up) would miss the request's TTFT objective; then the decode instance that would meet it
    soonest, among those where a step carrying the prompt stays within the tightest TPOT
    objective of the decodes running there."""
    if prefill_queued is not None:
        wait = latency.prefill_time(prefill_queued + prompt_tokens)
        if ttft_slo is None or wait <= ttft_slo:
            return None  # the prefill instances are not backed up for this request
    best, best_ttft = None, None
    for index, d in enumerate(decodes):
        ttft = latency.prefill_time(d.queued_prompt_tokens + prompt_tokens) + d.last_step_time
        step = latency.decode_time(max(1, d.num_running)) + latency.prefill_time(prompt_tokens)
        tpot_ok = d.min_running_tpot_slo is None or step <= d.min_running_tpot_slo
        if tpot_ok and (ttft_slo is None or ttft <= ttft_slo) \
                and (best_ttft is None or ttft < best_ttft):
            best, best_ttft = index, ttft
    return best
