"""4-bit weights on the CPU: asymmetric groups of 32 along the input dimension, as GGUF's Q4_1.

A decode step on the CPU reads every weight once per token, so it is bound by memory traffic:
4-bit codes move an eighth of float32's bytes. torch's CPU int4 kernel
(`_weight_int4pack_mm_for_cpu`) multiplies bfloat16 activations by packed codes; it computes
w = (q - 8) * scale + zero per group, so a group spanning [lo, hi] stores
scale = (hi - lo) / 15 and zero = lo + 8 * scale. Weights de-quantized from a Q4_1 GGUF
(the embedded model's) fit this grid again up to float rounding.

The int4 kernel wins only while few rows pass (memory-bound decode): from about 8 rows on, a
dense matmul of the same grid weight is faster (2-3x at 32-512 rows on this repository's
2-core CPU), so each layer also keeps a dense copy (DenseCopy): bfloat16 packed for oneDNN,
2.5 bytes a weight in all against float32's 4, where the CPU has AVX-512; float32 elsewhere.
The LM head is ranked in 4 bits too, its top tokens' logits recomputed in float32
(QuantizedHead).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from sloserve.model.cpu import PACKED_MAX_ROWS, mkl_packing_available

GROUP = 32
INT4_MAX_ROWS = 8  # above this a dense matmul is faster than torch's int4 kernel
# ...and than the native one (cpu_decode.cpp) above this: all 120 layer matmuls of SmolLM2,
# AMD EPYC (AVX2), 2 threads: 39 / 47 / 92 / 175 ms at 8 / 16 / 32 / 64 rows against float32
# MKL's 75 / 81 / 100 / 129 ms
NATIVE_MAX_ROWS = 32
QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


@functools.cache
def _mkldnn_packing() -> bool:
    """Whether oneDNN packs bfloat16 weights here: its bf16 path needs AVX-512 (bw, vl, dq)
    or AVX-NE-CONVERT, so AVX2-only CPUs multiply unpacked."""
    if not (hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.backends.mkldnn.is_available()):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 32, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


class DenseCopy:
    """The many-row path's weight, in the dtype this CPU multiplies fastest: bfloat16 packed
    for oneDNN where it can (AVX-512: 10-40% faster than F.linear at 5-1000 rows, and
    bit-identical), else float32 packed for MKL (AVX2-only CPUs emulate bfloat16 GEMMs:
    2-4x slower than float32 at 32-256 rows, seen on an AMD EPYC without AVX-512)."""

    PACK_ROWS = 32  # the libraries' batch hint; other row counts run on the same packing

    def __init__(self, weight: torch.Tensor):
        self.bf16 = _mkldnn_packing()
        if self.bf16:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(
                weight.to(torch.bfloat16).contiguous(), self.PACK_ROWS)
            return
        self.weight = weight.float().contiguous()
        self.mkl = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, self.PACK_ROWS) \
            if mkl_packing_available() else None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, in] (any float dtype) times the weight: [M, out] in the copy's dtype."""
        n = rows.shape[0]
        if not self.bf16:
            rows = rows.float()
            if self.mkl is None or n > PACKED_MAX_ROWS:
                return F.linear(rows, self.weight)
            return torch.ops.mkl._mkl_linear(rows, self.mkl, self.weight, None, n)
        # oneDNN compiles and keeps a kernel for every row count it meets: with steps of
        # any size (prompt chunks plus decodes) the engine's memory grew ~0.4 MB a request
        # without end (benchmarks/soak.py). Padded to a few sizes, the kernels stay few.
        rows = rows.to(torch.bfloat16)
        padded = _row_bucket(n)
        if padded != n:
            rows = F.pad(rows, (0, 0, 0, padded - n))
        return torch.ops.mkldnn._linear_pointwise(rows, self.weight, None, "none", [],
                                                  "")[:n]


def _row_bucket(n: int) -> int:
    """Row counts oneDNN sees: up to 16 as they are (decode), then multiples of 16 up to 256
    and of 64 beyond (at most 1/16 extra rows from 256 on)."""
    if n <= 16:
        return n
    step = 16 if n <= 256 else 64
    return -(-n // step) * step


def quantize_groups(weight: torch.Tensor, group: int = GROUP
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (int32 in 0..15, weight's shape) and per-group scale and zero ([N, K/group])."""
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return codes.to(torch.int32).reshape(rows, cols), scale, lo + 8 * scale


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      group: int = GROUP) -> torch.Tensor:
    rows, cols = codes.shape
    q = codes.float().reshape(rows, cols // group, group)
    return ((q - 8) * scale[..., None] + zero[..., None]).reshape(rows, cols)


def pack_nibbles(codes: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """Codes [N, K] (0..15) as cpu_decode.cpp's q4_linear reads them: [N, K / 2] bytes,
    byte j of a group holding code j (low nibble) and code j + group / 2 (high)."""
    rows, cols = codes.shape
    c = codes.to(torch.uint8).reshape(rows, cols // group, group)
    half = group // 2
    return (c[..., :half] | (c[..., half:] << 4)).reshape(rows, cols // 2).contiguous()


class Int4Linear(nn.Module):
    """A linear whose weight is 4-bit codes; activations run in bfloat16 through torch's
    kernel, or in float32 through the native q4_linear where cpu_decode.attach turned
    `native` on."""

    native = False

    def __init__(self, linear: nn.Linear, group: int = GROUP, max_rows: int = INT4_MAX_ROWS,
                 dense_weight: torch.Tensor | None = None):
        """dense_weight: what the many-row path multiplies by (default: the 4-bit grid, so
        that both paths compute the same product)."""
        super().__init__()
        self.in_features, self.out_features, self.group = \
            linear.in_features, linear.out_features, group
        self.max_rows = max_rows  # torch's int4 kernel up to this many rows, then the dense
        # copy (the native kernel, where on: up to NATIVE_MAX_ROWS)
        weight = linear.weight.detach()
        self.padded = -self.out_features % 16  # the packing takes whole tiles of 16 rows
        codes, scale, zero = quantize_groups(F.pad(weight, (0, 0, 0, self.padded)), group)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # The kernel wants [K/group, N, 2]; bfloat16 like the activations it scales.
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16),
                             persistent=False)
        n = self.out_features
        self.register_buffer("q4_codes", pack_nibbles(codes[:n], group), persistent=False)
        # float16, as GGUF's Q4_1: a group's 16 bytes of codes then carry 4, not 8, more
        self.register_buffer("q4_scales", scale[:n].half(), persistent=False)
        self.register_buffer("q4_mins", (zero - 8 * scale)[:n].half(), persistent=False)
        grid = dequantize_groups(codes, scale, zero, group)[:n]
        self.dense = DenseCopy(grid if dense_weight is None else dense_weight)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.native and rows.shape[0] <= NATIVE_MAX_ROWS:
            out = self.q4(rows.float())
        else:
            out = self.matmul(rows)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def q4(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 rows [M, in] times the 4-bit grid, natively: [M, out] float32."""
        return torch.ops.sloserve_cpu.q4_linear(rows, self.q4_codes, self.q4_scales,
                                                self.q4_mins)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, in] times the weight, without the bias: torch's int4 kernel (bfloat16)
        up to max_rows, then the dense copy (in its dtype)."""
        if rows.shape[0] > self.max_rows:
            return self.dense(rows)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows.to(torch.bfloat16), self.packed, self.group, self.scales_and_zeros)
        return out[:, : self.out_features] if self.padded else out


class QuantizedHead(nn.Module):
    """The LM head, ranked with 4-bit codes, with exact float logits for the tokens that
    matter.

    A small model's head is its largest matrix (SmolLM2-135M: 49152 x 576, 113 MB in
    float32, more than all its 4-bit layers together), so reading it in float32 took a third
    of a decode step; as int8 it still took 2.2 ms of a ~16 ms step, as int4 0.8 ms. But the
    kernels compute in bfloat16 and round their output to it: logits near 20 land on a grid
    of 0.125, and 4-bit codes move them further, which flips greedy choices ("The capital of
    France is" stopped ending in Paris). So the cheap logits only rank the vocabulary: the
    top `EXACT_TOP` tokens of each row get their logit recomputed in float32 from the float
    weight, which stays anyway (usually tied to the embedding). Greedy picks and the
    probability mass that sampling sees are then float32's as long as the true best token is
    in the 4-bit top 32: it was in the top 16 for all 1,896 rows of greedy replies to 40
    Vicuna questions (in the top 1 for 88%), the median gap from the 1st to the 32nd float
    logit 7.4."""

    EXACT_TOP = 32
    MAX_ROWS = 4  # int4 kernel up to here (one stream: 0.8 ms vs 2.2 ms dense), then bf16

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # float, shared with a tied embedding
        # many rows rank with a dense copy of the float weight (as fast as the grid there)
        self.ranking = Int4Linear(linear, max_rows=self.MAX_ROWS,
                                  dense_weight=self.weight.detach())  # its bias unused
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.in_features).float()
        if self.ranking.native and x.shape[0] <= NATIVE_MAX_ROWS:
            logits = self.ranking.q4(x)
        else:
            logits = self.ranking.matmul(x).float()
        if self.bias is not None:  # before ranking: the bias moves tokens up and down
            logits = logits + self.bias
        top = logits.topk(min(self.EXACT_TOP, self.out_features), dim=-1).indices
        exact = torch.einsum("rh,rkh->rk", x, self.weight[top])
        if self.bias is not None:
            exact = exact + self.bias[top]
        return logits.scatter_(1, top, exact)


def quantize_model_int4(model: nn.Module) -> None:
    """Swap the decoder's projection linears for Int4Linear and the LM head for
    QuantizedHead, in place. The embedding stays float (a lookup reads one row a token)."""
    if not int4_available():
        raise ValueError("--quantization int4 needs torch's CPU int4 kernel (torch >= 2.6)")
    for module in list(model.modules()):
        for name in QUANTIZED_LINEARS:
            linear = getattr(module, name, None)
            if isinstance(linear, nn.Linear) and linear.in_features % GROUP == 0:
                setattr(module, name, Int4Linear(linear))
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = QuantizedHead(model.lm_head)
