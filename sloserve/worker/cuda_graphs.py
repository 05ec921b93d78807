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
        self.block_size = kv_caches[0].shape[2]
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
            num_decodes=bs, max_query_len=1, prefills=[],
            max_seq_len=self.block_tables.shape[1] * self.block_size)

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


MIXED_SIZES = [32, 64, 128, 256, 512, 640, 768, 1024, 1536, 2048]


class MixedStepGraphs:
    """CUDA graphs for steps with prefill chunks: piecewise, as vLLM's, since a mixed step's
    attention grid depends on its sequences. Each captured token count T has L + 1 graphs:
    embedding + layer 0 up to attention, then from one layer's attention output to the next
    layer's q/k/v, ..., then the last layer's MLP. Attention runs eagerly between them on
    the step's real metadata; the pieces pass activations through static buffers. Eagerly,
    the ~10 small launches per layer cost ~25 ms of host time a step (H200, Llama-3-8B
    shape): more than the GPU work of a 512-token prefill. Steps of more than the largest
    size run eagerly; padded rows compute garbage nobody reads (attention and the KV cache
    see only the real tokens)."""

    def __init__(self, model: DecoderLM, max_tokens: int):
        self.model = model
        self.sizes = [s for s in MIXED_SIZES if s <= max_tokens]
        c, t = model.config, self.sizes[-1] if self.sizes else 0
        p = next(model.parameters())
        buffer = dict(dtype=p.dtype, device=p.device)
        self.input_ids = torch.zeros(t, dtype=torch.long, device=p.device)
        self.positions = torch.zeros(t, dtype=torch.long, device=p.device)
        self.qkv = torch.zeros((t, c.num_heads + 2 * c.num_kv_heads, c.head_dim), **buffer)
        self.attn = torch.zeros((t, c.num_heads, c.head_dim), **buffer)
        self.hidden = torch.zeros((t, c.hidden_size), **buffer)
        self.residual = torch.zeros((t, c.hidden_size), **buffer)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._capture()

    def fits(self, num_tokens: int) -> bool:
        return bool(self.sizes) and num_tokens <= self.sizes[-1]

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its pool
            pieces = []
            for piece in range(len(self.model.layers) + 1):
                self._piece(piece, size)  # warm-up: Triton compiles, cuBLAS picks kernels
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._piece(piece, size)
                pool = graph.pool()
                pieces.append(graph)
            self.graphs[size] = pieces

    def _piece(self, index: int, size: int) -> None:
        """Piece 0: embedding to layer 0's q/k/v; piece i: layer i-1's attention output to
        layer i's q/k/v; the last: the last layer's attention output to its MLP output."""
        layers, residual = self.model.layers, self.residual[:size]
        rope = self.model.rotary.at(self.positions[:size])
        if index == 0:
            x, residual = self.model.embed_tokens(self.input_ids[:size]), None
        else:
            x, residual = layers[index - 1].after_attention(self.attn[:size], residual)
        if index == len(layers):
            self.hidden[:size].copy_(x)
        else:
            (q, k, v), residual = layers[index].before_attention(x, residual, rope)
            heads, kv_heads = q.shape[1], k.shape[1]
            self.qkv[:size, :heads].copy_(q)
            self.qkv[:size, heads:heads + kv_heads].copy_(k)
            self.qkv[:size, heads + kv_heads:].copy_(v)
        if residual.data_ptr() != self.residual.data_ptr():  # the fused norms add in place
            self.residual[:size].copy_(residual)

    @torch.inference_mode()
    def run(self, step: StepInputs, kv_caches: list[torch.Tensor], meta: AttentionMetadata,
            logits_indices: torch.Tensor) -> torch.Tensor:
        """Logits of the rows at logits_indices of a step of n <= the largest size tokens."""
        n = len(step.input_ids)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        host = torch.tensor([step.input_ids + [0] * (size - n),
                             step.positions + [0] * (size - n)], dtype=torch.long)
        self.input_ids[:size].copy_(host[0], non_blocking=True)
        self.positions[:size].copy_(host[1], non_blocking=True)
        pieces = self.graphs[size]
        pieces[0].replay()
        for layer, cache, graph in zip(self.model.layers, kv_caches, pieces[1:]):
            attn = layer.self_attn
            q, k, v = self.qkv[:n].split([attn.heads, attn.kv_heads, attn.kv_heads], dim=1)
            self.attn[:n].copy_(attn.backend.forward(q, k, v, cache, meta, attn.scale))
            graph.replay()
        return self.model.logits(self.hidden[:n], self.residual[:n], logits_indices)
