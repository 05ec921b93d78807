"""A Plan: what one engine step computes. The runner and the simulator both consume it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sloserve.request import Request


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Compute `num_tokens` tokens of `request` starting at position `start`; when the chunk
    reaches the request's last known token, sample the next one."""

    request: Request
    start: int
    num_tokens: int
    sample: bool

    @property
    def is_decode(self) -> bool:
        """One new token after the prompt (a decode), as opposed to prompt work."""
        return self.num_tokens == 1 and self.start >= self.request.num_prompt_tokens


@dataclass(slots=True)
class Plan:
    now: float
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # request ids preempted this step
    # Requests whose KV came from another instance and got blocks in this step: the runner
    # writes that KV into their blocks before it computes the step.
    imported: list[Request] = field(default_factory=list)
    # Requests admission control turned away since the last step (already finished).
    rejected: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decodes(self) -> int:
        return sum(1 for c in self.chunks if c.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks if not c.is_decode)

    def signature(self) -> tuple:
        """A comparable summary: two schedulers agree when their signatures are equal."""
        chunks = tuple((c.request.request_id, c.start, c.num_tokens, c.sample) for c in self.chunks)
        return chunks, tuple(self.preempted)
