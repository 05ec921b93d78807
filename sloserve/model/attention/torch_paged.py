"""Reference attention backend: pure torch, runs anywhere torch does; every other backend
must match it (tests/model/test_triton_attention.py holds the Triton one to it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sloserve.model.attention.base import AttentionBackend, AttentionMetadata


class TorchPagedAttention(AttentionBackend):
    # decode rows through cpu_decode.cpp's loop (4-bit CPU models, where it builds): the
    # gather of every block and SDPA cost ~40 ms a step at 32 rows; float32 models keep
    # SDPA, whose summation order HF's matches token for token
    native_decode = False
    @staticmethod
    def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        kv_heads, dim = k.shape[-2:]
        slots = slots.long()
        cache[0].view(-1, kv_heads, dim).index_copy_(0, slots, k)
        cache[1].view(-1, kv_heads, dim).index_copy_(0, slots, v)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, heads, dim]; k, v: [T, kv_heads, dim]. Returns [T, heads, dim]."""
        slots = meta.per_step.get("slots")
        if slots is None:  # index_copy_ wants int64: converted once a step, not per layer
            slots = meta.per_step["slots"] = meta.slot_mapping.long()
        self.write_kv(cache, k, v, slots)
        if meta.num_decodes == q.shape[0]:  # decodes only
            return self._decode(q, cache, meta, scale)
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = self._decode(q[: meta.num_decodes], cache, meta, scale)
        tables = meta.block_tables[meta.num_decodes:]
        for (q_start, q_len, pos), table in zip(meta.prefills, tables):
            out[q_start:q_start + q_len] = self._prefill(
                q[q_start:q_start + q_len], cache, pos, table, scale)
        return out

    def _gather(self, cache: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """K and V of the blocks in `table` ([..., n]) as [..., n * block_size, kv_heads, dim]."""
        kv = cache[:, table]  # one gather for K and V
        kv = kv.reshape(2, *table.shape[:-1], -1, *kv.shape[-2:])
        return kv[0], kv[1]

    def _decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        n = meta.num_decodes
        if self.native_decode and q.dtype == torch.float32:
            return torch.ops.sloserve_cpu.decode_attention(
                q, cache, meta.block_tables[:n], meta.seq_lens[:n], scale)
        k, v = self._gather(cache, meta.block_tables[:n])  # [B, L, kvh, d]
        mask = meta.per_step.get("decode_mask")
        if mask is None:
            positions = torch.arange(k.shape[1], device=q.device)
            beyond = positions[None, :] >= meta.seq_lens[:n, None]
            # additive, in q's dtype: SDPA would convert a boolean mask in every layer
            mask = torch.zeros(beyond.shape, dtype=q.dtype, device=q.device).masked_fill_(
                beyond, float("-inf"))[:, None, None, :]
            meta.per_step["decode_mask"] = mask
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            scale=scale, enable_gqa=True)
        return out[:, :, 0, :]

    def _prefill(self, q: torch.Tensor, cache: torch.Tensor, pos: int, table: torch.Tensor,
                 scale: float) -> torch.Tensor:
        q_len = q.shape[0]
        context = pos + q_len
        k, v = self._gather(cache, table)
        k, v = k[:context].transpose(0, 1), v[:context].transpose(0, 1)
        if pos == 0:
            mask, causal = None, True
        else:  # query i sits at position pos + i and sees keys up to it
            rows = torch.arange(q_len, device=q.device)[:, None] + pos
            mask, causal = torch.arange(context, device=q.device)[None, :] <= rows, False
        # 4-D inputs: with 3-D ones torch's CPU SDPA falls back to its slow math path.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, is_causal=causal,
            scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
