"""OpenAI request bodies (pydantic, so /openapi.json matches what is accepted) and the
sloserve extensions: a per-request `slo` and `priority`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from sloserve.request import MAX_LOGPROBS, SLO, SamplingParams


class SLOSpec(BaseModel):
    """Latency objectives of one request (milliseconds); omitted ones use server defaults."""

    model_config = ConfigDict(extra="forbid")
    ttft_ms: Annotated[float, Field(gt=0)] | None = None
    tpot_ms: Annotated[float, Field(gt=0)] | None = None
    deadline_ms: Annotated[float, Field(gt=0)] | None = None
    realtime: bool = False
    utility: Annotated[float, Field(gt=0)] | None = None
    # out of reach at admission: 503 at once, or served after all on-time work
    on_miss: Literal["reject", "best_effort"] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1,
                   "repetition_penalty": 1.0}


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are ignored, as vLLM does

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    # None: the model's generation defaults (serve --generation-config), else OpenAI's
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: int | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    n: Annotated[int, Field(ge=1, le=16)] = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    slo: SLOSpec | None = None
    priority: int = 0

    def sampling_params(self, max_tokens: int, index: int,
                        defaults: dict[str, float] | None = None) -> SamplingParams:
        """`defaults`: the model's generation defaults, for the fields the request omits."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        defaults = {**OPENAI_DEFAULTS, **(defaults or {})}
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                 "repetition_penalty": self.repetition_penalty}
        sampling = {k: defaults[k] if v is None else v for k, v in given.items()}
        return SamplingParams(
            max_tokens=max_tokens, **sampling,
            seed=None if self.seed is None else self.seed + index,
            stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, min_tokens=min(self.min_tokens, max_tokens),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs_count())

    def logprobs_count(self) -> int | None:
        """Alternatives to return per output token; None: no log-probabilities."""
        return None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def slo_with_defaults(self, defaults: SLO) -> SLO:
        given = self.slo.model_dump(exclude_none=True) if self.slo else {}
        merged = {"ttft_ms": defaults.ttft_ms, "tpot_ms": defaults.tpot_ms,
                  "deadline_ms": defaults.deadline_ms, **given}
        return SLO(**merged)


class CompletionRequest(GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def logprobs_count(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(GenerationBody):
    messages: list[ChatMessage]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


def error_body(message: str, err_type: str, code: int | str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error format."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
