"""Requests and what rides along with them: sampling parameters and latency objectives.

Pure Python: the scheduler, the simulator and the engine all share these objects.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default --max-logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probability and the likeliest alternatives (id, logprob)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the reply's text, enforced token by token by a grammar engine:
    "json" (a JSON schema, as text), "regex", "choice" (a JSON list of strings, one of which
    is the whole reply) or "grammar" (Lark syntax, as llguidance reads it)."""

    kind: str
    spec: str

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {STRUCTURED_KINDS}, "
                             f"got {self.kind!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    # vLLM's semantics: repetition divides positive / multiplies negative logits of tokens
    # seen in the prompt or output; frequency and presence subtract per output occurrence
    # and once per output token (OpenAI's).
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: none; k >= 0: each output token's log-probability under the model's raw
    # distribution (before penalties and temperature, as vLLM's default), with the k likeliest
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    structured: StructuredOutput | None = None  # None: any text

    def __post_init__(self) -> None:
        # Accept lists and a single string, as OpenAI clients send them.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for token, bias in self.logit_bias:
            if not (isinstance(token, int) and token >= 0 and -100 <= bias <= 100):
                raise ValueError(f"logit_bias maps token ids >= 0 to values in [-100, 100], "
                                 f"got {token!r}: {bias!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


ON_MISS = (None, "reject", "best_effort")


@dataclass(frozen=True)
class SLO:
    """A request's latency objectives; None means the request carries no such objective."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    deadline_ms: float | None = None  # end-to-end, from arrival
    realtime: bool = False
    utility: float | None = None  # None: the policy's default for the request's class
    # When admission control finds the objective out of reach: "reject" (HTTP 503 at once)
    # or "best_effort" (served after all on-time work). None: the policy's default.
    on_miss: str | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "deadline_ms", "utility"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"slo.{name} must be a positive number, got {value!r}")
        if self.on_miss not in ON_MISS:
            raise ValueError(f"slo.on_miss must be one of {', '.join(map(str, ON_MISS))}, "
                             f"got {self.on_miss!r}")

    @property
    def slo_class(self) -> str:
        return "realtime" if self.realtime else "default"

    @property
    def has_objectives(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.deadline_ms))

    def attained(self, ttft: float | None, tpot: float | None, e2e: float | None) -> bool:
        """Whether measured times (seconds) meet every objective this SLO carries. No first
        token or no finish misses; no TPOT (a one-token reply) cannot miss."""
        def within(limit: float | None, value: float | None, missing_ok: bool) -> bool:
            if limit is None:
                return True
            return missing_ok if value is None else value * 1e3 <= limit

        return (within(self.ttft_ms, ttft, False) and within(self.tpot_ms, tpot, True)
                and within(self.deadline_ms, e2e, False))


class RequestStatus(enum.IntEnum):
    """Ordered: everything at or past FINISHED_STOPPED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    WAITING_FOR_REMOTE_KV = 3  # prefilled on another instance; its KV is on its way here
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7
    FINISHED_REJECTED = 8  # admission control: its objective was out of reach

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
    RequestStatus.FINISHED_REJECTED: "rejected",
}


@dataclass(eq=False)
class Request:
    """One generation: token counters, timings and the KV blocks it holds. No tensors."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    slo: SLO = field(default_factory=SLO)
    arrival_time: float = 0.0
    priority: int = 0  # lower runs first among equals, as in vLLM
    eos_token_id: int | None = None

    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # if asked for
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    kv_transfer_time: float | None = None  # disaggregated: prefill's KV export to import
    # Admission control: why it was rejected, or that it now runs only on spare capacity.
    reject_reason: str | None = None
    best_effort: bool = False

    def handoff_copy(self) -> Request:
        """A prefilled request as a decode instance takes it over: tokens, timings and how
        many tokens have KV; no blocks (they stay behind and are freed there)."""
        copy = Request(self.request_id, self.prompt_token_ids, self.sampling_params, self.slo,
                       self.arrival_time, self.priority, self.eos_token_id)
        copy.output_token_ids = list(self.output_token_ids)
        copy.output_logprobs = list(self.output_logprobs)
        copy.num_computed_tokens = self.num_computed_tokens
        for name in ("first_scheduled_time", "first_token_time", "last_token_time"):
            setattr(copy, name, getattr(self, name))
        return copy

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not computed yet: the whole prompt at first, then 1 per decode."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def queueing_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's definition)."""
        if self.first_token_time is None or self.last_token_time is None:
            return None
        if self.num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)
