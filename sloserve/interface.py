"""What an engine is to the code that drives it: the HTTP server, `LLM`, the bench driver.

`EngineClient` is the one protocol: a single engine (`engine.LLMEngine`, with or without
tensor parallelism) and a cluster of instances (`cluster.frontend.ClusterEngine`) implement
it, and nothing above them reads their insides. Its outputs are typed: `RequestOutput`,
`RequestTimings` and `EngineStats`. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sloserve.request import SLO, Request, SamplingParams, TokenLogprob

Prompt = str | list[int] | list[dict[str, str]]  # text, token ids, or chat messages


@dataclass(frozen=True, slots=True)
class RequestTimings:
    """A request's clock readings (seconds, the engine's clock) as of one output."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finish: float | None = None
    tpot: float | None = None  # mean time per output token after the first
    kv_transfer: float | None = None  # disaggregated: prefill's KV export to import

    @classmethod
    def of(cls, request: Request) -> RequestTimings:
        return cls(request.arrival_time, request.first_scheduled_time,
                   request.first_token_time, request.finish_time, request.tpot,
                   request.kv_transfer_time)

    @property
    def queueing(self) -> float | None:
        return _since(self.first_scheduled, self.arrival)

    @property
    def ttft(self) -> float | None:
        return _since(self.first_token, self.arrival)

    @property
    def e2e(self) -> float | None:
        return _since(self.finish, self.arrival)

    def attained(self, slo: SLO) -> bool | None:
        """Whether every objective of `slo` held; None when it carries none."""
        if not slo.has_objectives:
            return None
        return slo.attained(self.ttft, self.tpot, self.e2e)

    def as_ms(self, slo: SLO) -> dict[str, float | bool | None]:
        """The `timings` extension of sloserve's HTTP replies."""
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1e3, 3)

        return {"queueing_ms": ms(self.queueing), "ttft_ms": ms(self.ttft),
                "tpot_ms": ms(self.tpot), "e2e_ms": ms(self.e2e),
                "kv_transfer_ms": ms(self.kv_transfer), "slo_attained": self.attained(slo)}


def _since(end: float | None, start: float) -> float | None:
    return None if end is None else end - start


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request; `text` and `token_ids` are cumulative. A
    request that failed (e.g. its instance died past recovery) finishes with `error` set."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    delta_text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    timings: RequestTimings
    slo: SLO
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # cumulative, as token_ids, when asked for

    @classmethod
    def failure(cls, request: Request, message: str, now: float) -> RequestOutput:
        return cls(request.request_id, request.prompt_token_ids, "", "", [], True, "error",
                   RequestTimings(request.arrival_time, finish=now), request.slo, message)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Queue sizes and KV use, summed over every instance behind the engine."""

    num_running: int
    num_waiting: int  # not yet admitted, preempted ones included
    num_preempted: int
    kv_cache_usage: float  # fraction of KV blocks in use


class EngineClient(Protocol):
    """The engine interface. `make_request` and `tokenize` are safe from any thread (they
    only validate); the rest belongs to the one thread that drives the engine."""

    model_name: str
    max_model_len: int

    def tokenize(self, prompt: Prompt) -> list[int]: ...

    def make_request(self, prompt: Prompt, params: SamplingParams | None = None,
                     slo: SLO | None = None, request_id: str | None = None,
                     arrival_time: float | None = None, priority: int = 0) -> Request: ...

    def submit(self, request: Request) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
