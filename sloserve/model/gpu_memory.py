"""Size the KV cache from --gpu-memory-utilization after a profiling forward pass (as vLLM)."""

from __future__ import annotations

import torch

from sloserve.model.attention import AttentionMetadata
from sloserve.model.decoder import DecoderLM


def kv_blocks_for_gpu(model: DecoderLM, block_size: int, max_tokens: int, max_seqs: int,
                      utilization: float) -> int:
    """Blocks that fit in utilization x the GPU's memory next to the weights, the CUDA context,
    other processes and the activations of the largest step (max_tokens tokens, max_seqs
    sampled rows)."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError("gpu_memory_utilization must be in (0, 1]")
    device = next(model.parameters()).device
    peak_step = _profile_step(model, block_size, max_tokens, max_seqs, device)
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free  # weights, CUDA context, other processes
    available = utilization * total - in_use - peak_step
    c = model.config
    per_block = c.kv_bytes_per_token(next(model.parameters()).dtype.itemsize) * block_size
    blocks = int(available // per_block)
    if blocks < 1:
        raise ValueError(
            f"no room for a KV cache: {in_use / 2**30:.1f} GiB in use and "
            f"{peak_step / 2**30:.1f} GiB for activations exceed "
            f"gpu_memory_utilization={utilization} of {total / 2**30:.1f} GiB")
    return blocks


def _profile_step(model: DecoderLM, block_size: int, max_tokens: int, max_seqs: int,
                  device: torch.device) -> int:
    """Bytes the largest step allocates beyond what stays allocated."""
    c = model.config
    tokens = min(max_tokens, c.max_position_embeddings)
    pages = -(-tokens // block_size)
    caches = [torch.zeros((2, pages, block_size, c.num_kv_heads, c.head_dim),
                          dtype=next(model.parameters()).dtype, device=device)
              for _ in range(c.num_layers)]
    i32 = dict(dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(tokens, **i32),
        query_start_loc=torch.tensor([0, tokens], **i32),
        seq_lens=torch.tensor([tokens], **i32),
        block_tables=torch.arange(pages, **i32)[None],
        num_decodes=0, max_query_len=tokens, prefills=[(0, tokens, 0)], max_seq_len=tokens)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    positions = torch.arange(tokens, device=device)
    logits_indices = torch.full((max_seqs,), tokens - 1, device=device)
    logits = model(torch.zeros(tokens, dtype=torch.long, device=device), positions, caches,
                   meta, logits_indices)
    logits.sort(dim=-1)  # top-p / top-k sampling sorts the logits of every sampled row
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base  # base holds the throwaway caches
    del caches, logits, meta
    torch.cuda.empty_cache()
    return peak
