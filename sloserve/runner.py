"""Plan -> tensors -> forward -> sampled tokens."""

from __future__ import annotations

import torch

from sloserve.core.plan import Plan, ScheduledChunk
from sloserve.model.attention import AttentionMetadata
from sloserve.model.decoder import DecoderLM
from sloserve.model.sampler import Sampler


class ModelRunner:
    def __init__(self, model: DecoderLM, num_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        c = model.config
        shape = (2, num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(c.num_layers)]
        self.sampler = Sampler(self.device)

    def execute(self, plan: Plan) -> dict[str, int]:
        """Run one step; returns the sampled token of every chunk that samples."""
        if plan.is_empty:
            return {}
        decodes = [c for c in plan.chunks if c.num_tokens == 1]
        prefills = [c for c in plan.chunks if c.num_tokens > 1]
        chunks = decodes + prefills
        input_ids, positions, meta = self._prepare(decodes, prefills)
        ends = torch.tensor([c.num_tokens for c in chunks]).cumsum(0) - 1
        sampling = [i for i, c in enumerate(chunks) if c.sample]
        if not sampling:
            self.model(input_ids, positions, self.kv_caches, meta, ends[:0].to(self.device))
            return {}
        logits_indices = ends[sampling].to(self.device)
        logits = self.model(input_ids, positions, self.kv_caches, meta, logits_indices)
        requests = [chunks[i].request for i in sampling]
        tokens = self.sampler(logits, requests)
        return {r.request_id: t for r, t in zip(requests, tokens)}

    def _prepare(self, decodes: list[ScheduledChunk], prefills: list[ScheduledChunk]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids: list[int] = [c.request.token_id_at(c.start) for c in decodes]
        pos: list[int] = [c.start for c in decodes]
        for c in prefills:
            ids.extend(c.request.all_token_ids[c.start:c.start + c.num_tokens])
            pos.extend(range(c.start, c.start + c.num_tokens))
        positions = torch.tensor(pos, dtype=torch.long)
        tables = [torch.tensor(c.request.block_ids, dtype=torch.long) for c in decodes + prefills]
        slots = torch.cat([table[p // self.block_size] * self.block_size + p % self.block_size
                           for table, p in zip(tables, self._positions_per_chunk(
                               positions, decodes, prefills))])
        prefill_meta, q_start = [], len(decodes)
        for c, table in zip(prefills, tables[len(decodes):]):
            prefill_meta.append((q_start, c.num_tokens, c.start, table.to(self.device)))
            q_start += c.num_tokens
        meta = AttentionMetadata(
            slot_mapping=slots.to(self.device),
            num_decodes=len(decodes),
            decode_block_tables=_pad(tables[:len(decodes)]).to(self.device),
            decode_context_lens=torch.tensor([c.start + 1 for c in decodes],
                                             device=self.device),
            prefills=prefill_meta,
        )
        to = self.device
        return torch.tensor(ids, dtype=torch.long).to(to), positions.to(to), meta

    @staticmethod
    def _positions_per_chunk(positions: torch.Tensor, decodes: list[ScheduledChunk],
                             prefills: list[ScheduledChunk]) -> list[torch.Tensor]:
        sizes = [1] * len(decodes) + [c.num_tokens for c in prefills]
        return list(positions.split(sizes))

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)


def _pad(tables: list[torch.Tensor]) -> torch.Tensor:
    if not tables:
        return torch.zeros((0, 1), dtype=torch.long)
    return torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)
