"""GPU attention backend: Triton kernels over the paged KV cache.

One kernel serves decodes, prefill chunks and mixed steps: a program takes BLOCK_Q query tokens
of one sequence and every query head of one KV head (GQA: K and V are read once for the whole
group), walks that sequence's pages with an online softmax, and masks causally by absolute
position. A second kernel writes a step's new K and V into the cache in one launch. Sequences
with seq_len 0 and slots of -1 are padding (CUDA-graph batches are padded to a captured size).

On the CPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1), which is how CI
checks them against the pure-torch backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sloserve.model.attention.base import AttentionBackend, AttentionMetadata


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, k_stride, v_stride, plane_stride,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        ok = offs < ROW
        k = tl.load(k_ptr + token * k_stride + offs, mask=ok)
        v = tl.load(v_ptr + token * v_stride + offs, mask=ok)
        tl.store(cache_ptr + slot * ROW + offs, k, mask=ok)
        tl.store(cache_ptr + plane_stride + slot * ROW + offs, v, mask=ok)


# The block table's width changes from step to step; Triton would compile a variant for
# each of width 1, a multiple of 16, and the rest (~1 s each, in the middle of serving: the
# first request after start took 1.4 s on the H200).
@triton.jit(do_not_specialize=["table_stride"])
def _paged_attention_kernel(
        out_ptr, q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, scale,
        q_stride_t, q_stride_h, out_stride_t, out_stride_h, plane_stride, table_stride,
        partial_ptr, stats_ptr,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
        NUM_SPLITS: tl.constexpr):
    seq = tl.program_id(0)
    tile = tl.program_id(1) // NUM_SPLITS
    split = tl.program_id(1) % NUM_SPLITS
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_Q < q_len:
        context = tl.load(seq_lens_ptr + seq)
        rows = tl.arange(0, BLOCK_M)
        token = tile * BLOCK_Q + rows // GROUP  # query index within the sequence
        head = kv_head * GROUP + rows % GROUP
        row_ok = (token < q_len) & (rows < BLOCK_Q * GROUP)
        position = context - q_len + token  # absolute position of each query row
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + token)[:, None] * q_stride_t
                    + head[:, None] * q_stride_h + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # keys this tile can see: up to the position of its last query token
        visible_end = context - q_len + tl.minimum((tile + 1) * BLOCK_Q, q_len)
        # split-KV (decode steps with few sequences): this program takes one slice of the keys
        span = tl.cdiv(tl.cdiv(visible_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        first = split * span
        stop = tl.minimum(first + span, visible_end)
        table = block_tables_ptr + seq * table_stride
        for start in range(first, stop, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < stop
            block = tl.load(table + n // PAGE, mask=n_ok, other=0).to(tl.int64)
            offset = (block * PAGE + n % PAGE) * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(cache_ptr + offset[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(cache_ptr + plane_stride + offset[:, None] + d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(n_ok[None, :] & (n[None, :] <= position[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out_mask = row_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + (q_start + token)[:, None] * out_stride_t
                     + head[:, None] * out_stride_h + d[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:  # unnormalised partials; _combine_splits_kernel merges them
            heads = KV_HEADS * GROUP
            part = ((q_start + token) * heads + head) * NUM_SPLITS + split
            tl.store(partial_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
            tl.store(stats_ptr + part * 2, m_i, mask=row_ok)
            tl.store(stats_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(out_ptr, partial_ptr, stats_ptr, out_stride_t, out_stride_h,
                           HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           NUM_SPLITS: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    base = (token * HEADS + head) * NUM_SPLITS
    splits = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    m = tl.load(stats_ptr + (base + splits) * 2)
    l_split = tl.load(stats_ptr + (base + splits) * 2 + 1)
    acc = tl.load(partial_ptr + (base + splits)[:, None] * HEAD_DIM + d[None, :],
                  mask=(l_split > 0.0)[:, None] & d_ok[None, :], other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.where(l_split > 0.0, tl.exp(m - m_max), 0.0)
    total = tl.sum(weight * l_split, 0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * out_stride_t + head * out_stride_h + d,
             out.to(out_ptr.dtype.element_ty), mask=d_ok)


class TritonPagedAttention(AttentionBackend):
    """Same contract as TorchPagedAttention; metadata tensors are int32 on the device."""

    block_n = 64  # keys per loop iteration
    num_warps, num_stages = 4, 3  # Triton's defaults; benchmarks/gpu_step_profile.py sweeps
    # Decode steps of up to this many (sequence, KV head) programs: 32 keys an iteration,
    # 2 warps, 4 stages. H200, Llama-3-8B shape, context 1,024, one layer: batch 64 206 ->
    # 155 us, batch 1 194 -> 141 us; at batch 256 the defaults stay best (gpu_step_profile).
    small_decode_programs = 1024
    fused_ops = True  # the model pairs this backend with the fused RMSNorm and rotary kernels
    supports_cuda_graphs = True

    def write_kv(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        row = k.shape[1] * k.shape[2]
        _write_kv_kernel[(k.shape[0],)](
            k, v, cache, slots, k.stride(0), v.stride(0), cache.stride(0),
            ROW=row, BLOCK=triton.next_power_of_2(row))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, heads, dim]; k, v: [T, kv_heads, dim]. Returns [T, heads, dim]."""
        self.write_kv(cache, k, v, meta.slot_mapping)
        heads, dim = q.shape[1], q.shape[2]
        kv_heads = k.shape[1]
        group = heads // kv_heads
        # decode-only steps want few query tokens per program; prefills want more rows per
        # K/V tile. tl.dot needs at least 16 rows.
        block_q = max(1, (16 if meta.max_query_len == 1 else 64) // group)
        block_m = max(16, triton.next_power_of_2(block_q * group))
        out = torch.empty_like(q)
        num_seqs = meta.seq_lens.shape[0]
        splits = self._num_splits(meta, num_seqs * kv_heads, q.device)
        partial = stats = out  # unused unless the keys are split
        if splits > 1:
            partial = torch.empty((q.shape[0], heads, splits, dim), dtype=torch.float32,
                                  device=q.device)
            stats = torch.empty((q.shape[0], heads, splits, 2), dtype=torch.float32,
                                device=q.device)
        grid = (num_seqs, triton.cdiv(meta.max_query_len, block_q) * splits, kv_heads)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        block_d = triton.next_power_of_2(dim)
        block_n, warps, stages = self.block_n, self.num_warps, self.num_stages
        if meta.max_query_len == 1 and num_seqs * kv_heads <= self.small_decode_programs:
            block_n, warps, stages = 32, 2, 4
        _paged_attention_kernel[grid](
            out, q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), cache.stride(0),
            meta.block_tables.stride(0), partial, stats,
            KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_Q=block_q,
            BLOCK_M=block_m, BLOCK_N=block_n, PAGE=self.block_size, PRECISION=precision,
            NUM_SPLITS=splits, num_warps=warps, num_stages=stages)
        if splits > 1:
            _combine_splits_kernel[(q.shape[0], heads)](
                out, partial, stats, out.stride(0), out.stride(1), HEADS=heads, HEAD_DIM=dim,
                BLOCK_D=block_d, NUM_SPLITS=splits)
        return out

    @staticmethod
    def _num_splits(meta: AttentionMetadata, programs: int, device: torch.device) -> int:
        """Decode steps with few sequences leave most SMs idle while each program walks a
        long context: split the keys so that about two programs run per SM. The count depends
        on shapes only, so a captured CUDA graph stays valid for any context length."""
        if meta.max_query_len != 1:
            return 1
        # under the CPU interpreter: pretend 16 SMs, so tests cover the split path
        sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 16)
        return min(16, triton.next_power_of_2(max(1, -(-2 * sms // programs))))
