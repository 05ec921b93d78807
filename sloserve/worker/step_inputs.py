"""A Plan packed into the host-side lists of one step: single-token chunks first (the rows
the decode kernels and CUDA graphs take), then every multi-token chunk."""

from __future__ import annotations

from dataclasses import dataclass

from sloserve.core.plan import Plan, ScheduledChunk


@dataclass
class StepInputs:
    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]
    query_lens: list[int]
    tables: list[list[int]]
    num_single: int  # the first num_single sequences compute one token each

    @property
    def has_multi_token_chunks(self) -> bool:
        return self.num_single < len(self.query_lens)


def order_chunks(plan: Plan) -> list[ScheduledChunk]:
    """The step's row order: one-token chunks (decodes, and a recompute's last token), then
    the rest. The attention kernels' fast path takes the first group."""
    single = [c for c in plan.chunks if c.num_tokens == 1]
    return single + [c for c in plan.chunks if c.num_tokens > 1]


def pack(chunks: list[ScheduledChunk], block_size: int) -> StepInputs:
    num_single = sum(1 for c in chunks if c.num_tokens == 1)
    step = StepInputs([], [], [], [], [], [], num_single)
    for c in chunks:
        table = c.request.block_ids
        end = c.start + c.num_tokens
        if c.num_tokens == 1:
            step.input_ids.append(c.request.token_id_at(c.start))
        else:
            step.input_ids.extend(c.request.all_token_ids[c.start:end])
        step.positions.extend(range(c.start, end))
        step.slots.extend(table[p // block_size] * block_size + p % block_size
                          for p in range(c.start, end))
        step.seq_lens.append(end)
        step.query_lens.append(c.num_tokens)
        step.tables.append(table)
    return step
