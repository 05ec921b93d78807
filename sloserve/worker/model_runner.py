"""One rank's model, KV cache and step execution (as nano-vllm's `ModelRunner(config, rank)`).

Every rank builds one: it loads its shard, sizes its KV cache (all ranks agree on the
smallest), and on CUDA captures its decode graphs. Rank 0 also samples; it receives each Plan
from the engine, packs it, broadcasts the packed step to the other ranks (`peers`, see
ranks.py) and runs its own forward, while ranks > 0 run the forwards rank 0 broadcasts.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from sloserve.config import EngineConfig
from sloserve.core.plan import Plan
from sloserve.model import loader
from sloserve.model.attention import AttentionMetadata
from sloserve.model.gpu_memory import kv_blocks_for_gpu
from sloserve.model.sampler import Logprobs, Sampler, to_device
from sloserve.model.structured import GrammarMasks
from sloserve.request import TokenLogprob
from sloserve.worker import dist
from sloserve.worker.cuda_graphs import DecodeGraphs, MixedStepGraphs
from sloserve.worker.step_inputs import StepInputs, order_chunks, pack


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, peers: Any = None):
        """`peers`: rank 0's handle on the other ranks (ranks.RankGroup), None with one."""
        self.rank, self.peers = rank, peers
        self.size = config.tensor_parallel_size
        self.block_size = config.block_size
        self.device, self.dtype = config.torch_device, config.torch_dtype
        if config.threads and self.device.type == "cpu":
            torch.set_num_threads(config.threads)
        self.loaded = loader.load(config.model, self.dtype, self.device, config.block_size,
                                  config.attention_backend, rank, self.size,
                                  config.quantization)
        self.model = self.loaded.model
        self.num_blocks = self._size_kv_cache(config)
        c = self.model.config
        shape = (2, self.num_blocks, config.block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(c.num_layers)]
        self.sampler = Sampler(self.device)
        self._grammars: GrammarMasks | None = None  # made for the first constrained request
        self._mask_thread: ThreadPoolExecutor | None = None
        self.graphs = self.mixed_graphs = None
        # CUDA graphs are single-rank for now: NCCL inside captured graphs is not wired up
        if (self.device.type == "cuda" and not config.enforce_eager and self.size == 1
                and self.model.backend.supports_cuda_graphs):
            max_blocks = -(-c.max_position_embeddings // config.block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_caches,
                                       config.scheduler.max_num_seqs, max_blocks)
            self.mixed_graphs = MixedStepGraphs(self.model,
                                                config.scheduler.max_num_batched_tokens)

    def _size_kv_cache(self, config: EngineConfig) -> int:
        """Blocks of this rank's KV heads; every rank runs this in step (the GPU sizing runs
        a forward, which all-reduces across the ranks), then all take the smallest."""
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        elif self.device.type == "cuda":
            s = config.scheduler
            num_blocks = kv_blocks_for_gpu(self.model, config.block_size,
                                           s.max_num_batched_tokens, s.max_num_seqs,
                                           config.gpu_memory_utilization)
        else:
            per_token = self.model.config.kv_bytes_per_token(self.dtype.itemsize)
            tokens = int(config.kv_cache_memory_gb * 2**30) // per_token
            num_blocks = max(1, tokens // config.block_size)
        return dist.agree_on_blocks(num_blocks, self.device) if self.size > 1 else num_blocks

    # ---- rank 0 ----------------------------------------------------------------------------
    def execute(self, plan: Plan) -> dict[str, int]:
        """Run one step; returns the sampled token of every chunk that samples."""
        return self.launch(plan).get()

    def launch(self, plan: Plan) -> PendingTokens:
        """Enqueue one step and its sampling on the device without waiting for it: the host
        may work on while the GPU runs; PendingTokens.get() waits for the tokens."""
        chunks = order_chunks(plan)
        sampling = [i for i, c in enumerate(chunks) if c.sample]
        if not chunks:
            return PendingTokens([], None)
        step = pack(chunks, self.block_size)
        requests = [chunks[i].request for i in sampling]
        masks = self._start_masks(requests)
        if self.peers is not None:  # tensor parallel: the other ranks run the same step
            self.peers.broadcast(("step", step))
        if self.graphs is not None and not step.has_multi_token_chunks \
                and self.graphs.fits(step.num_single):
            logits = self.graphs.run(step)
            if len(sampling) < step.num_single:
                logits = logits[to_device(sampling, torch.long, self.device)]
        else:
            ends = torch.tensor(step.query_lens).cumsum(0) - 1
            indices = ends[sampling].to(self.device, non_blocking=True)
            if self.mixed_graphs is not None and self.mixed_graphs.fits(len(step.input_ids)):
                logits = self.mixed_graphs.run(step, self.kv_caches, self.metadata(step),
                                               indices)
            else:
                logits = self.forward(step, indices)
        if not sampling:
            return PendingTokens([], None)
        return PendingTokens([r.request_id for r in requests], *self.sampler.sample(
            logits, requests, masks.result() if masks is not None else None))

    def _start_masks(self, requests: list) -> Future | None:
        """The constrained requests' token masks, computed beside the forward pass."""
        if not any(r.sampling_params.structured is not None for r in requests):
            return None
        if self._grammars is None:
            tokenizer, c = self.loaded.tokenizer, self.model.config
            self._grammars = GrammarMasks(tokenizer, c.vocab_size,
                                          loader.eos_token_id(tokenizer, c))
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return self._mask_thread.submit(self._grammars.masks, requests)

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """KV of these blocks with every KV head (the other ranks send rank 0 theirs):
        [layers, 2, blocks, block_size, kv_heads, dim]."""
        local = self.read_blocks(block_ids)
        if self.peers is None:
            return local
        self.peers.broadcast(("read_kv", block_ids))
        return dist.gather_heads(local, self.size)

    def import_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Write KV of every KV head into these blocks: rank i keeps the i-th slice."""
        if self.peers is None:
            return self.write_blocks(block_ids, kv)
        shards = [c.contiguous() for c in kv.to(self.device, self.dtype)
                  .chunk(self.size, dim=4)]
        self.peers.broadcast(("write_kv", block_ids, tuple(shards[0].shape)))
        self.write_blocks(block_ids, dist.scatter_heads(shards))

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)
        if self._grammars is not None:
            self._grammars.release(request_id)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one)."""
        if self.peers is not None:
            self.peers.shutdown()
            self.peers = None

    # ---- every rank -----------------------------------------------------------------------
    def forward(self, step: StepInputs, logits_indices: torch.Tensor) -> torch.Tensor:
        to = self.device
        return self.model(to_device(step.input_ids, torch.long, to),
                          to_device(step.positions, torch.long, to),
                          self.kv_caches, self.metadata(step), logits_indices)

    def metadata(self, step: StepInputs) -> AttentionMetadata:
        to, i32 = self.device, torch.int32
        query_start = [0]
        for n in step.query_lens:
            query_start.append(query_start[-1] + n)
        multi = [(query_start[i], step.query_lens[i], step.seq_lens[i] - step.query_lens[i])
                 for i in range(step.num_single, len(step.query_lens))]
        return AttentionMetadata(
            slot_mapping=to_device(step.slots, i32, to),
            query_start_loc=to_device(query_start, i32, to),
            seq_lens=to_device(step.seq_lens, i32, to),
            block_tables=pad_tables(step.tables).to(to, non_blocking=True),
            num_decodes=step.num_single, max_query_len=max(step.query_lens),
            prefills=multi, max_seq_len=max(step.seq_lens))

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

    def follow(self, message: tuple) -> bool:
        """Ranks > 0: run what rank 0 broadcast; False once it says stop."""
        kind, *payload = message
        if kind == "step":
            self.forward(payload[0], torch.zeros(0, dtype=torch.long, device=self.device))
        elif kind == "read_kv":  # disaggregation: rank 0 gathers every rank's KV heads
            dist.gather_heads(self.read_blocks(payload[0]), self.size)
        elif kind == "write_kv":  # ...and scatters them on the importing side
            block_ids, shape = payload
            self.write_blocks(block_ids, dist.scatter_heads(
                None, torch.empty(shape, dtype=self.dtype, device=self.device)))
        return kind != "stop"


class PendingTokens:
    """A launched step's sampled tokens, still on the device until get()."""

    def __init__(self, request_ids: list[str], tokens: torch.Tensor | None,
                 logprobs: Logprobs | None = None):
        self.request_ids, self.tokens, self._logprobs = request_ids, tokens, logprobs

    def get(self) -> dict[str, int]:
        """Wait for the step (the host's one sync with it); request id -> token."""
        if self.tokens is None:
            return {}
        return dict(zip(self.request_ids, self.tokens.tolist()))

    def logprobs(self) -> dict[str, TokenLogprob]:
        """After get(): request id -> its token's log-probability, for those that asked."""
        return {} if self._logprobs is None else self._logprobs.read()


def pad_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=1)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
