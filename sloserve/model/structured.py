"""Structured output: a grammar engine (llguidance) keeps each constrained request's
reply inside its grammar by masking, at every step, the tokens that would leave it.

llguidance was picked over xgrammar by measured cost on the 2-core CPU with SmolLM2's
49k vocabulary (JSON schema, 30 tokens): 0.07 ms per token's mask against 0.21 ms, and it
installs with no dependencies (xgrammar pulls triton and a TVM runtime). Its vocabulary
table takes 0.3 s to build: GrammarMasks is made when the first constrained request runs.
JSON allows no free whitespace: with it, the first mask of a schema with strings took 2-17 s.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any

import torch

try:
    import llguidance
    import llguidance.hf
except ImportError:  # a GPU machine without it still serves everything unconstrained
    llguidance = None

from sloserve.request import Request, StructuredOutput

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)  # intake checks what the runner compiles again
def grammar_of(constraint: StructuredOutput) -> str:
    """The llguidance grammar for a constraint; ValueError naming what is wrong."""
    if llguidance is None:
        raise ValueError("structured output needs the llguidance package on this server")
    kind, spec = constraint.kind, constraint.spec
    if kind == "json":
        schema = json.loads(spec)
        if isinstance(schema, dict):
            # no whitespace beyond single separators: with free whitespace, small models
            # fill replies with newlines until max_tokens (vLLM's disable-any-whitespace)
            schema.setdefault("x-guidance", {"whitespace_flexible": False})
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(spec)
    elif kind == "choice":
        choices = json.loads(spec)
        if not (isinstance(choices, list) and choices
                and all(isinstance(c, str) and c for c in choices)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        grammar = llguidance.LLMatcher.grammar_from_regex(
            "|".join(re.escape(c) for c in choices))
    else:
        grammar = llguidance.LLMatcher.grammar_from_lark(spec)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"invalid {kind} constraint: {'; '.join(messages)}")
    return grammar


def check(constraint: StructuredOutput | None) -> None:
    """Raise ValueError if the constraint cannot be compiled (at intake, not mid-step)."""
    if constraint is not None:
        try:
            grammar_of(constraint)
        except Exception as e:  # json.loads, llguidance: whatever fails is the caller's
            raise ValueError(str(e) or f"invalid {constraint.kind} constraint") from None


class GrammarMasks:
    """Per-request matchers and the step's token masks. A matcher catches up on the
    request's output tokens when the mask is next needed, so it follows preemption,
    recomputation and the overlapped step loop without being told."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_id: int | None):
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
        self.tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=eos_token_id)
        self._matchers: dict[str, tuple[llguidance.LLMatcher, list[int]]] = {}

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def masks(self, requests: list[Request]) -> tuple[list[int], torch.Tensor] | None:
        """The rows (indices into `requests`) that are constrained and their allowed-token
        bitmasks [rows, ceil(vocab / 32)] int32 on the host; None when no row is."""
        rows = [i for i, r in enumerate(requests) if r.sampling_params.structured is not None]
        if not rows:
            return None
        # llguidance's width (its vocabulary may hold a token or two past the model's)
        words = (max(self.vocab_size, self.tokenizer.vocab_size) + 31) // 32
        bitmask = torch.empty((len(rows), words), dtype=torch.int32)
        for row, i in enumerate(rows):
            matcher = self._caught_up(requests[i])
            if matcher.is_error():  # cannot happen while masks hold; if it does, end the reply
                log.warning("grammar of %s failed: %s", requests[i].request_id,
                            matcher.get_error())
                bitmask[row] = self._only_eos(words)
                continue
            matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), words * 4)
        return rows, bitmask

    def _only_eos(self, words: int) -> torch.Tensor:
        row = torch.zeros(words, dtype=torch.int32)
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            row[eos // 32] = torch.tensor(1 << (eos % 32)).to(torch.int32)
        return row

    def _caught_up(self, request: Request) -> llguidance.LLMatcher:
        entry = self._matchers.get(request.request_id)
        if entry is None:
            grammar = grammar_of(request.sampling_params.structured)
            entry = (llguidance.LLMatcher(self.tokenizer, grammar), [0])
            self._matchers[request.request_id] = entry
        matcher, consumed = entry
        new = request.output_token_ids[consumed[0]:]
        if new:
            matcher.consume_tokens(new)
            consumed[0] += len(new)
        return matcher


def apply_masks(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set the logits of tokens outside each constrained row's grammar to -inf, in place."""
    vocab = logits.shape[-1]
    bits = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bits[:, :, None] >> shifts) & 1).bool().reshape(len(rows), -1)[:, :vocab]
    index = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
