"""GPU attention backend: FlashAttention 3 (Hopper) over the paged KV cache, from the
kernels vLLM ships (`vllm.vllm_flash_attn`), where they are installed.

Steps that carry a prefill chunk go to FA3: its warp-specialised kernels prefill 4k / 16k /
28k-token prompts in 0.92x / 0.80x / 0.72x the Triton kernels' time on an H200; decode-only
steps (those CUDA graphs replay) stay on the Triton kernels, as fast there (FA3: 1.02x /
1.04x / 0.97x at batch 1 / 64 / 256; benchmarks/results/attention_backends.json). K and V
are written by the Triton backend's kernel; FA3 reads the cache as it lies ([num_blocks,
block_size, kv_heads, dim] per plane) through the block table, with each sequence's length
from seq_lens, so padded rows (seq_len 0) cost nothing. bfloat16 / float16 only; `auto`
picks it on CUDA where vLLM is installed.
"""

from __future__ import annotations

import torch

from sloserve.model.attention.base import AttentionMetadata
from sloserve.model.attention.triton_paged import TritonPagedAttention

try:
    from vllm.vllm_flash_attn import flash_attn_varlen_func
except (ImportError, OSError):  # no vLLM here, or one built for another torch: not offered
    flash_attn_varlen_func = None

FA_VERSION = 3


class FlashPagedAttention(TritonPagedAttention):
    fused_ops = True
    supports_cuda_graphs = True

    def __init__(self, block_size: int):
        if flash_attn_varlen_func is None:
            raise ValueError("attention backend 'flash' needs vLLM's FlashAttention kernels "
                             "(vllm.vllm_flash_attn), which are not installed")
        if block_size % 16:
            raise ValueError(f"attention backend 'flash' needs a block size that is a "
                             f"multiple of 16, not {block_size}")
        super().__init__(block_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.max_query_len == 1:
            return super().forward(q, k, v, cache, meta, scale)
        self.write_kv(cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        max_seq_len = meta.max_seq_len or meta.block_tables.shape[1] * self.block_size
        flash_attn_varlen_func(
            q=q, k=cache[0], v=cache[1], out=out,
            cu_seqlens_q=meta.query_start_loc, max_seqlen_q=meta.max_query_len,
            seqused_k=meta.seq_lens, max_seqlen_k=max_seq_len,
            softmax_scale=scale, causal=True, block_table=meta.block_tables,
            fa_version=FA_VERSION)
        return out
