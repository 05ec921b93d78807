"""OpenAI request bodies (pydantic, so /openapi.json matches what is accepted) and the
extensions: sloserve's per-request `slo` and `priority`, vLLM's `structured_outputs` (and its
older `guided_*` fields), `top_k`, `repetition_penalty`, `min_tokens`, `ignore_eos`.

As OpenAI's API does, an unknown field is a 400 naming it: a field that would change the
reply must never be dropped silently."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sloserve.request import MAX_LOGPROBS, SLO, SamplingParams, StructuredOutput
from sloserve.server.tools import ToolMode, render_messages, tool_mode


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
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured-output extension: exactly one of these."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark syntax


def _constraint(kind: str, value: Any) -> StructuredOutput:
    if kind == "json" and not isinstance(value, str):
        value = json.dumps(value)
    if kind == "choice":
        value = json.dumps(value)
    return StructuredOutput(kind, value)


OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1,
                   "repetition_penalty": 1.0}


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None  # for the caller's own records; changes nothing
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> StructuredOutput | None:
        """The reply's structured-output constraint, from whichever field gives one."""
        found = []
        if self.response_format is not None and self.response_format.type != "text":
            rf = self.response_format
            if rf.type == "json_object":
                found.append(("json", {"type": "object"}))
            elif rf.json_schema is None:
                raise ValueError("response_format of type json_schema needs json_schema")
            else:
                found.append(("json", rf.json_schema.json_schema))
        so = self.structured_outputs
        for kind, value in (("json", so.json_ if so else None), ("regex", so and so.regex),
                            ("choice", so and so.choice), ("grammar", so and so.grammar),
                            ("json", self.guided_json), ("regex", self.guided_regex),
                            ("choice", self.guided_choice), ("grammar", self.guided_grammar)):
            if value is not None:
                found.append((kind, value))
        if len(found) > 1:
            raise ValueError("give at most one of response_format, structured_outputs and "
                             "the guided_* fields")
        return _constraint(*found[0]) if found else None

    def bias(self) -> tuple[tuple[int, float], ...]:
        try:
            return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())
        except ValueError:
            raise ValueError("logit_bias keys must be token ids") from None

    def sampling_params(self, max_tokens: int, index: int,
                        defaults: dict[str, float] | None = None,
                        constraint: StructuredOutput | None = None) -> SamplingParams:
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
            logprobs=self.logprobs_count(), logit_bias=self.bias(), structured=constraint)

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
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=16)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def logprobs_count(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionSpec(BaseModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(GenerationBody):
    messages: list[ChatMessage]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def tool_mode(self) -> ToolMode | None:
        return tool_mode([t.model_dump(exclude_none=True) for t in self.tools or []] or None,
                         self.tool_choice.model_dump() if isinstance(
                             self.tool_choice, NamedToolChoice) else self.tool_choice,
                         self.parallel_tool_calls)

    def constraint(self) -> StructuredOutput | None:
        """The tool choice's grammar, or the response format's: not both."""
        given = super().constraint()
        mode = self.tool_mode()
        forced = mode.constraint() if mode is not None else None
        if forced is not None and given is not None:
            raise ValueError("a required or named tool_choice fixes the reply's format; "
                             "drop response_format")
        return forced or given

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text(),
                     "tool_calls": [c.model_dump() for c in m.tool_calls or []]}
                    for m in self.messages]
        return render_messages(messages, self.tool_mode())


def error_body(message: str, err_type: str, code: int | str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error format."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
