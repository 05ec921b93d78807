"""`LLM(model, **config).generate(...)`: offline batch generation on the engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sloserve.config import EngineConfig
from sloserve.engine import LLMEngine, OverlappedSteps
from sloserve.interface import Prompt, RequestTimings
from sloserve.profiler import calibrate
from sloserve.request import SamplingParams, TokenLogprob


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    timings: RequestTimings
    logprobs: list[TokenLogprob] | None = None  # per output token, when asked for


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        calibrate(self.engine)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[GenerationResult]:
        """Run every prompt to completion, batched together; results in prompt order.
        A prompt is text, a list of token ids, or a list of chat messages."""
        prompts = _as_list(prompts)
        params = sampling_params if isinstance(sampling_params, Sequence) else (
            [sampling_params or SamplingParams()] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = self._add_all(prompts, params)
        finals = {}
        steps = OverlappedSteps(self.engine)
        while steps.has_work():
            for out in steps.step():
                if out.finished:
                    finals[out.request_id] = GenerationResult(
                        out.request_id, out.prompt_token_ids, out.text, list(out.token_ids),
                        out.finish_reason, out.timings,
                        None if out.logprobs is None else list(out.logprobs))
        return [finals[i] for i in ids]

    def _add_all(self, prompts: list[Prompt], params: Sequence[SamplingParams]) -> list[str]:
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p).request_id)
        except Exception:
            for request_id in ids:  # all or nothing: leave no request queued
                self.engine.abort(request_id)
            raise
        return ids


def _as_list(prompts: Any) -> list[Prompt]:
    """One prompt (text, token ids, chat) or a list of them."""
    if isinstance(prompts, str) or not prompts:
        return [prompts]
    first = prompts[0]
    if isinstance(first, (int, dict)):
        return [prompts]
    return list(prompts)
