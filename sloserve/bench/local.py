"""Drive an in-process engine with a workload in real time (no HTTP): arrivals are added at
their offsets, the engine steps in between, and every token's arrival time is recorded."""

from __future__ import annotations

import time
from collections.abc import Callable

from sloserve.interface import EngineClient
from sloserve.request import SamplingParams
from sloserve.workload.metrics import RequestRecord
from sloserve.workload.spec import RequestSpec


def run_engine(engine: EngineClient, specs: list[RequestSpec], temperature: float = 0.0,
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
            request = engine.make_request(prompt, SamplingParams(
                max_tokens=spec.max_tokens, temperature=temperature, ignore_eos=ignore_eos),
                spec.slo, rid, arrival_time=start + spec.arrival)
            engine.submit(request)
            records[rid] = RequestRecord.start(spec.index, spec.slo_class, spec.slo,
                                               spec.arrival)
            records[rid].prompt_tokens = request.num_prompt_tokens
            token_times[rid] = []
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[i].arrival - now))
            continue
        for out in engine.step():
            t = time.monotonic() - start
            if out.error is not None:  # e.g. its instance died past recovery
                records[out.request_id].error = out.error
                token_times.pop(out.request_id, None)
                continue
            token_times[out.request_id].append(t)
            if out.finished:
                record = records[out.request_id]
                record.output_tokens = len(out.token_ids)
                ms = out.timings.as_ms(out.slo)
                record.queue_ms, record.kv_transfer_ms = ms["queueing_ms"], ms["kv_transfer_ms"]
                record.finish(token_times.pop(out.request_id), t)
                if on_finish:
                    on_finish()
    duration = time.monotonic() - start
    return sorted(records.values(), key=lambda r: r.index), duration
