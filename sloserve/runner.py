"""Plan -> tensors -> forward -> sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sloserve.core.plan import Plan, ScheduledChunk
from sloserve.model.attention import AttentionMetadata
from sloserve.model.decoder import DecoderLM
from sloserve.model.sampler import Sampler


@dataclass
class StepInputs:
    """Host-side lists of one step, decodes first."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]
    query_lens: list[int]
    tables: list[list[int]]
    num_decodes: int


class ModelRunner:
    def __init__(self, model: DecoderLM, num_blocks: int, block_size: int,
                 cuda_graph_max_batch: int = 0):
        self.model = model
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        c = model.config
        shape = (2, num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(c.num_layers)]
        self.sampler = Sampler(self.device)
        self.ranks = None  # TensorParallelRanks when this is rank 0 of several
        self.graphs = None
        if cuda_graph_max_batch and self.device.type == "cuda":
            from sloserve.model.cuda_graphs import DecodeGraphs
            max_blocks = -(-c.max_position_embeddings // block_size)
            self.graphs = DecodeGraphs(model, self.kv_caches, cuda_graph_max_batch, max_blocks)

    def execute(self, plan: Plan) -> dict[str, int]:
        """Run one step; returns the sampled token of every chunk that samples."""
        if plan.is_empty:
            return {}
        decodes = [c for c in plan.chunks if c.num_tokens == 1]
        prefills = [c for c in plan.chunks if c.num_tokens > 1]
        chunks = decodes + prefills
        step = self._step_inputs(decodes, prefills)
        sampling = [i for i, c in enumerate(chunks) if c.sample]
        if self.ranks is not None:  # tensor parallel: the other ranks run the same step
            self.ranks.broadcast(("step", step))
        if self.graphs is not None and not prefills and self.graphs.fits(len(decodes)):
            logits = self.graphs.run(step)[sampling]
        else:
            ends = torch.tensor(step.query_lens).cumsum(0) - 1
            logits = self.forward(step, ends[sampling].to(self.device))
        if not sampling:
            return {}
        requests = [chunks[i].request for i in sampling]
        tokens = self.sampler(logits, requests)
        return {r.request_id: t for r, t in zip(requests, tokens)}

    def forward(self, step: StepInputs, logits_indices: torch.Tensor) -> torch.Tensor:
        to = self.device
        i32 = dict(dtype=torch.int32, device=to)
        query_start = [0]
        for n in step.query_lens:
            query_start.append(query_start[-1] + n)
        prefills = [(query_start[i], step.query_lens[i], step.seq_lens[i] - step.query_lens[i])
                    for i in range(step.num_decodes, len(step.query_lens))]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slots, **i32),
            query_start_loc=torch.tensor(query_start, **i32),
            seq_lens=torch.tensor(step.seq_lens, **i32),
            block_tables=pad_tables(step.tables).to(to),
            num_decodes=step.num_decodes, max_query_len=max(step.query_lens),
            prefills=prefills)
        return self.model(torch.tensor(step.input_ids, dtype=torch.long, device=to),
                          torch.tensor(step.positions, dtype=torch.long, device=to),
                          self.kv_caches, meta, logits_indices)

    def _step_inputs(self, decodes: list[ScheduledChunk],
                     prefills: list[ScheduledChunk]) -> StepInputs:
        bs = self.block_size
        step = StepInputs([], [], [], [], [], [], len(decodes))
        for c in decodes + prefills:
            table = c.request.block_ids
            end = c.start + c.num_tokens
            if c.num_tokens == 1:
                step.input_ids.append(c.request.token_id_at(c.start))
            else:
                step.input_ids.extend(c.request.all_token_ids[c.start:end])
            step.positions.extend(range(c.start, end))
            step.slots.extend(table[p // bs] * bs + p % bs for p in range(c.start, end))
            step.seq_lens.append(end)
            step.query_lens.append(c.num_tokens)
            step.tables.append(table)
        return step

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """KV of these blocks, every layer: [layers, 2, blocks, block_size, kv_heads, dim]."""
        index = torch.tensor(block_ids, device=self.device)
        return torch.stack([cache[:, index] for cache in self.kv_caches])

    def write_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        index = torch.tensor(block_ids, device=self.device)
        kv = kv.to(self.device, self.dtype)
        if kv.is_cuda:  # staged on a side stream: keep its memory until this stream is done
            kv.record_stream(torch.cuda.current_stream(self.device))
        for cache, layer in zip(self.kv_caches, kv):
            cache[:, index] = layer

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """read_blocks with every KV head: tensor-parallel ranks send rank 0 their heads."""
        local = self.read_blocks(block_ids)
        if self.ranks is None:
            return local
        import torch.distributed as dist

        self.ranks.broadcast(("read_kv", block_ids))
        shards = [torch.empty_like(local) for _ in range(self.ranks.size)]
        dist.gather(local, shards, dst=0)
        return torch.cat(shards, dim=4)  # [layers, 2, blocks, block_size, kv_heads, dim]

    def import_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """write_blocks from every KV head: rank i gets the i-th slice of the heads."""
        if self.ranks is None:
            return self.write_blocks(block_ids, kv)
        import torch.distributed as dist

        shards = [c.contiguous() for c in kv.to(self.device, self.dtype)
                  .chunk(self.ranks.size, dim=4)]
        self.ranks.broadcast(("write_kv", block_ids, tuple(shards[0].shape)))
        mine = torch.empty_like(shards[0])
        dist.scatter(mine, shards, src=0)
        self.write_blocks(block_ids, mine)

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)


def pad_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=1)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
