"""Drive an in-process engine with a workload in real time (no HTTP): arrivals are added at
their offsets, the engine steps in between, and every token's arrival time is recorded."""

from __future__ import annotations

import time
from collections.abc import Callable

from sloserve.bench.metrics import RequestRecord
from sloserve.bench.workload import RequestSpec
from sloserve.engine import LLMEngine
from sloserve.request import SamplingParams


def run_engine(engine: LLMEngine, specs: list[RequestSpec], temperature: float = 0.0,
               ignore_eos: bool = False, on_finish: Callable[[], None] | None = None
               ) -> tuple[list[RequestRecord], float]:
    """Returns the records in spec order and the run's duration in seconds."""
    pending = sorted(specs, key=lambda s: s.arrival)
    records: dict[str, RequestRecord] = {}
    token_times: dict[str, list[float]] = {}
    start = time.monotonic()
    i = 0
    while i < len(pending) or engine.has_unfinished():
        now = time.monotonic() - start
        while i < len(pending) and pending[i].arrival <= now:
            spec = pending[i]
            rid = f"bench-{spec.index}"
            prompt = spec.extra.get("tokens") or (
                [{"role": "user", "content": spec.text}] if spec.chat else spec.text)
            request = engine.add_request(prompt, SamplingParams(
                max_tokens=spec.max_tokens, temperature=temperature, ignore_eos=ignore_eos),
                spec.slo, rid,
                arrival_time=start + spec.arrival)
            records[rid] = RequestRecord.start(spec.index, spec.slo_class, spec.slo,
                                               spec.arrival)
            records[rid].prompt_tokens = request.num_prompt_tokens
            token_times[rid] = []
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[i].arrival - now))
            continue
        for request_id, error in engine.take_failures():  # e.g. an instance died
            records[request_id].error = str(error)
            token_times.pop(request_id, None)
        for out in engine.step():
            t = time.monotonic() - start
            token_times[out.request_id].append(t)
            if out.finished:
                record = records[out.request_id]
                record.output_tokens = len(out.token_ids)
                queued = out.timings["queueing_time"]
                record.queue_ms = None if queued is None else queued * 1e3
                transfer = out.timings.get("kv_transfer_time")
                record.kv_transfer_ms = None if transfer is None else transfer * 1e3
                record.finish(token_times.pop(out.request_id), t)
                if on_finish:
                    on_finish()
    duration = time.monotonic() - start
    return sorted(records.values(), key=lambda r: r.index), duration
