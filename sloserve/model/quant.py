"""4-bit weights on the CPU: asymmetric groups of 32 along the input dimension, as GGUF's Q4_1.

A decode step on the CPU reads every weight once per token, so it is bound by memory traffic:
4-bit codes move an eighth of float32's bytes. torch's CPU int4 kernel
(`_weight_int4pack_mm_for_cpu`) multiplies bfloat16 activations by packed codes; it computes
w = (q - 8) * scale + zero per group, so a group spanning [lo, hi] stores
scale = (hi - lo) / 15 and zero = lo + 8 * scale. Weights de-quantized from a Q4_1 GGUF
(the embedded model's) fit this grid again up to float rounding.

The int4 kernel wins only while few rows pass (memory-bound decode): from about 8 rows on, a
dense bfloat16 matmul of the same grid weight is faster (2-3x at 32-512 rows on this
repository's 2-core CPU), so each layer also keeps that bfloat16 copy: 2.5 bytes a weight in
all, against float32's 4 (and 8 with MKL's packed copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32
INT4_MAX_ROWS = 8  # above this a dense bfloat16 matmul is faster than the int4 kernel
QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


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


class Int4Linear(nn.Module):
    """A linear whose weight is 4-bit codes; activations run in bfloat16."""

    def __init__(self, linear: nn.Linear, group: int = GROUP):
        super().__init__()
        self.in_features, self.out_features, self.group = \
            linear.in_features, linear.out_features, group
        codes, scale, zero = quantize_groups(linear.weight, group)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # The kernel wants [K/group, N, 2]; bfloat16 like the activations it scales.
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16),
                             persistent=False)
        dense = dequantize_groups(codes, scale, zero, group).to(torch.bfloat16)
        self.register_buffer("dense_weight", dense, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] > INT4_MAX_ROWS:
            out = F.linear(rows, self.dense_weight)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, self.packed, self.group, self.scales_and_zeros)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def quantize_model_int4(model: nn.Module) -> None:
    """Swap the decoder's projection linears for Int4Linear in place.
    The embedding and the (often tied) LM head stay float: they set the logits' precision."""
    if not int4_available():
        raise ValueError("--quantization int4 needs torch's CPU int4 kernel (torch >= 2.6)")
    for module in list(model.modules()):
        for name in QUANTIZED_LINEARS:
            linear = getattr(module, name, None)
            if isinstance(linear, nn.Linear) and linear.in_features % GROUP == 0:
                setattr(module, name, Int4Linear(linear))
