"""Fused small ops for the GPU path: residual add + RMSNorm, rotary embedding in place, and
the MLP's SiLU(gate) * up.

Measured on an H100 (Llama-3-8B shape): even under CUDA graphs each kernel costs a few
microseconds of fixed latency, and the torch versions of these two ops take ~14 kernels per
layer (casts, gathers, halves, cat); fused they take 3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, size, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * size
    offs = tl.arange(0, BLOCK)
    ok = offs < size
    x = tl.load(x_ptr + row + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:  # the sum is rounded to the model's dtype first, as an unfused add would
        x = x + tl.load(residual_ptr + row + offs, mask=ok, other=0.0)
        tl.store(residual_ptr + row + offs, x, mask=ok)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / size + eps)
    w = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, size] contiguous. With `residual`: residual += x (in place), normalise that."""
    out = torch.empty_like(x)
    size = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](
        x, residual if residual is not None else x, weight, out, size, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(size))
    return out


@triton.jit
def _rotary_kernel(x_ptr, positions_ptr, cos_ptr, sin_ptr, token_stride,
                   HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (h < HEADS) & (i < HALF)
    cos = tl.load(cos_ptr + position * HALF + i, mask=i < HALF, other=0.0)
    sin = tl.load(sin_ptr + position * HALF + i, mask=i < HALF, other=0.0)
    first = x_ptr + token.to(tl.int64) * token_stride + h * (2 * HALF) + i
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=ok)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=ok)


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> None:
    """Rotate x: [T, heads, dim] (heads contiguous, any token stride) in place; HF layout:
    the two halves of a head form the pairs. cos, sin: [max_positions, dim / 2] float32."""
    heads, dim = x.shape[1], x.shape[2]
    _rotary_kernel[(x.shape[0],)](
        x, positions, cos, sin, x.stride(0), HEADS=heads, HALF=dim // 2,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(dim // 2))


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    gate = tl.load(x_ptr + row * 2 * size + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * size + size + offs, mask=ok, other=0.0).to(tl.float32)
    # rounded to the model's dtype between the two ops, as F.silu(gate) * up rounds
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * size + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] contiguous (gate, then up) -> SiLU(gate) * up: [T, I]. Unfused, torch
    runs two strided elementwise kernels and a temporary: ~1 ms a step at batch 256 (H200,
    Llama-3-8B shape, benchmarks/gpu_step_profile.py)."""
    size = x.shape[-1] // 2
    out = torch.empty((x.shape[0], size), dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(size, block))](x, out, size, BLOCK=block)
    return out
