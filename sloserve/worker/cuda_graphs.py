"""CUDA graphs for decode-only steps.

A decode step of a large model is ~32 layers x ~10 small kernels; launched one by one from
Python the GPU idles between them. Each captured batch size replays all of them in one launch.
A step with n decodes runs the smallest captured size >= n: the extra rows are padding
(seq_len 0, slot -1) that the Triton kernels skip. The inputs live in static buffers sized for
the largest batch; every graph reads slices of them.
"""

from __future__ import annotations

import bisect

import torch

from sloserve.model.attention import AttentionMetadata
from sloserve.model.decoder import DecoderLM
from sloserve.worker.step_inputs import StepInputs

CAPTURE_SIZES = [1, 2, 4, 8] + list(range(16, 1025, 16))


class DecodeGraphs:
    def __init__(self, model: DecoderLM, kv_caches: list[torch.Tensor], max_batch: int,
                 max_blocks: int):
        self.sizes = [s for s in CAPTURE_SIZES if s < max_batch] + [max_batch]
        device = kv_caches[0].device
        i32 = dict(dtype=torch.int32, device=device)
        self.tokens = torch.zeros((4, max_batch), **i32)  # ids, positions, slots, seq_lens
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.query_start = torch.arange(max_batch + 1, **i32)
        self.block_tables = torch.zeros((max_batch, max_blocks), **i32)
        self.logits_indices = torch.arange(max_batch, device=device)
        self.tokens[2].fill_(-1)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture(model, kv_caches)

    def fits(self, num_decodes: int) -> bool:
        return num_decodes <= self.sizes[-1]

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.tokens[2, :bs], query_start_loc=self.query_start[: bs + 1],
            seq_lens=self.tokens[3, :bs], block_tables=self.block_tables[:bs],
            num_decodes=bs, max_query_len=1, prefills=[])

    def _capture(self, model: DecoderLM, kv_caches: list[torch.Tensor]) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first: the smaller ones reuse its pool
            args = (self.input_ids[:bs], self.positions[:bs], kv_caches, self._meta(bs),
                    self.logits_indices[:bs])
            model(*args)  # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = model(*args)
            pool = graph.pool()
            self.graphs[bs] = (graph, logits)

    def run(self, step: StepInputs) -> torch.Tensor:
        """Logits [n, vocab] of a decode-only step of n <= max_batch sequences."""
        n = len(step.input_ids)
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        pad = bs - n
        host = torch.tensor([step.input_ids + [0] * pad, step.positions + [0] * pad,
                             step.slots + [-1] * pad, step.seq_lens + [0] * pad],
                            dtype=torch.int32)
        self.tokens[:, :bs].copy_(host, non_blocking=True)
        self.input_ids[:bs].copy_(self.tokens[0, :bs])
        self.positions[:bs].copy_(self.tokens[1, :bs])
        width = max(len(t) for t in step.tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in step.tables],
                              dtype=torch.int32)
        self.block_tables[:n, :width].copy_(tables, non_blocking=True)
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]
