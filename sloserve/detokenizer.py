"""Incremental detokenization and stop strings, one per request."""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Turns tokens into text as they arrive. Decoding a short window, not the whole output,
    keeps each step cheap; a trailing half of a multi-byte character is held back."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False  # a stop string was found; text is cut before it

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; returns the new text (empty while a character is incomplete)."""
        self.token_ids.extend(token_ids)
        decode = self.tokenizer.decode
        window = self.token_ids[self._prefix_offset:]
        prefix = decode(self.token_ids[self._prefix_offset:self._read_offset],
                        skip_special_tokens=True)
        full = decode(window, skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return self._append(delta)

    def _append(self, delta: str) -> str:
        if not self.stop:
            self.text += delta
            return delta
        start = max(0, len(self.text) - max(len(s) for s in self.stop) + 1)
        combined = self.text + delta
        cut = min((i for i in (combined.find(s, start) for s in self.stop) if i >= 0),
                  default=-1)
        if cut < 0:
            self.text = combined
            return delta
        self.stopped = True
        new_text = combined[:cut]
        delta = new_text[len(self.text):]
        self.text = new_text
        return delta
