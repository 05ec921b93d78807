"""What every attention backend reads (the step's metadata) and offers (the backend class).

Tokens of a step are packed (no padding): first every single-token sequence (decodes), then
each multi-token chunk. The cache of one layer is [2, num_blocks, block_size, kv_heads, dim].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class AttentionMetadata:
    """One row per sequence of the step, decodes first. Index tensors are int32."""

    slot_mapping: torch.Tensor  # [T] cache slot of each new token (block * block_size + offset)
    query_start_loc: torch.Tensor  # [S + 1] where each sequence's query tokens start in q
    seq_lens: torch.Tensor  # [S] tokens each sequence attends to, its new tokens included
    block_tables: torch.Tensor  # [S, max_blocks], padded with 0
    num_decodes: int  # the first num_decodes sequences have one query token each
    max_query_len: int
    prefills: list[tuple[int, int, int]]  # host copy for the torch backend: (query start,
    #                                       query len, start position) per multi-token chunk
    max_seq_len: int = 0  # the longest seq_len (a bound under CUDA graphs); 0: unknown
    # a backend's per-step values (masks, ...): the first layer computes, the others reuse
    per_step: dict = field(default_factory=dict)


class AttentionBackend:
    """Paged attention over one layer's cache; subclasses register in __init__.py."""

    # The decoder also uses the backend's fused RMSNorm / rotary kernels (triton_ops).
    fused_ops: ClassVar[bool] = False
    # Steps through this backend may be captured in CUDA graphs (no host sync inside).
    supports_cuda_graphs: ClassVar[bool] = False

    def __init__(self, block_size: int):
        self.block_size = block_size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, heads, dim]; k, v: [T, kv_heads, dim]. Writes k, v into the cache at
        meta.slot_mapping and returns [T, heads, dim]."""
        raise NotImplementedError
