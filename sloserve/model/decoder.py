"""Decoder-only transformer for the Llama family (SmolLM2, Llama 2/3) and Qwen2.

Tokens of many requests are packed into one sequence; attention reads and writes the paged KV
cache through a backend. q/k/v and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sloserve.model.attention import AttentionBackend, AttentionMetadata
from sloserve.model.config import ModelConfig

try:  # the GPU path's fused kernels
    from sloserve.model import triton_ops
except ImportError:
    triton_ops = None


class RMSNorm(nn.Module):
    fused = False  # True: one Triton kernel (GPU path)

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the residual stream (when given) and normalise; returns (normed, new residual)."""
        if self.fused:
            if residual is None:
                return triton_ops.rms_norm(x, self.weight, self.eps), x
            return triton_ops.rms_norm(x, self.weight, self.eps, residual), residual
        if residual is not None:
            x = x + residual
        normed = F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps)
        return normed.to(x.dtype), x


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    # float32 arithmetic, as HF does, so greedy outputs match it bit for bit
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = dict(config.rope_scaling)
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    old_len = s["original_max_position_embeddings"]
    low_wavelen = old_len / s["low_freq_factor"]
    high_wavelen = old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, smoothed, scaled)


class Rotary(nn.Module):
    fused = False  # True: rotate q and k in place with one Triton kernel (GPU path)

    def __init__(self, config: ModelConfig):
        super().__init__()
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(config))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def at(self, positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The rotation of one step's tokens, applied by every layer: the cos / sin rows are
        gathered once a step, not once a layer. It maps x: [tokens, heads, dim] to x rotated
        (HF layout: the two halves of a head form the pairs)."""
        if self.fused:
            def rotate_in_place(x: torch.Tensor) -> torch.Tensor:
                triton_ops.rotary_(x, positions, self.cos, self.sin)
                return x
            return rotate_in_place
        cos, sin = self.cos[positions], self.sin[positions]
        # x * [cos, cos] + [x2, x1] * [-sin, sin]: HF's x1 cos - x2 sin, x2 cos + x1 sin to
        # the bit, in five ops a layer instead of nine (a decode step on the CPU is op-bound)
        cos = torch.cat((cos, cos), dim=-1)[:, None, :]
        sin = torch.cat((-sin, sin), dim=-1)[:, None, :]

        def rotate(x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            x1, x2 = xf.chunk(2, dim=-1)
            return (xf * cos + torch.cat((x2, x1), dim=-1) * sin).to(x.dtype)
        return rotate


class Attention(nn.Module):
    all_reduce = False  # True on a tensor-parallel shard

    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.heads, self.kv_heads, self.dim = config.num_heads, config.num_kv_heads, config.head_dim
        qkv_out = (self.heads + 2 * self.kv_heads) * self.dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.dim, config.hidden_size, bias=False)
        self.backend = backend
        self.scale = self.dim ** -0.5

    def forward(self, x: torch.Tensor, rope: Callable[[torch.Tensor], torch.Tensor],
                cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project(x, rope)
        return self.output(self.backend.forward(q, k, v, cache, meta, self.scale))

    def project(self, x: torch.Tensor, rope: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated) and v of the step's tokens: [T, heads or kv_heads, dim] views."""
        qkv = self.qkv_proj(x).view(-1, self.heads + 2 * self.kv_heads, self.dim)
        qk = rope(qkv[:, : self.heads + self.kv_heads])  # q and k in one pass
        q, k = qk.split([self.heads, self.kv_heads], dim=1)
        return q, k, qkv[:, self.heads + self.kv_heads:]

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        out = self.o_proj(attn.reshape(-1, self.heads * self.dim))
        if self.all_reduce:  # tensor parallel: each rank summed over its own heads
            dist.all_reduce(out)
        return out


class MLP(nn.Module):
    all_reduce = False  # True on a tensor-parallel shard
    fused = False  # True: SiLU(gate) * up in one Triton kernel (GPU path)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused:
            out = self.down_proj(triton_ops.silu_and_mul(gate_up))
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            out = self.down_proj(F.silu(gate) * up)
        if self.all_reduce:  # tensor parallel: each rank summed over its own columns
            dist.all_reduce(out)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, rope, cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns this layer's output and the residual stream before it (added by the next
        norm, so that add and norm are one fused kernel on the GPU)."""
        (q, k, v), residual = self.before_attention(x, residual, rope)
        attn = self.self_attn.backend.forward(q, k, v, cache, meta, self.self_attn.scale)
        return self.after_attention(attn, residual)

    # The two halves around attention: piecewise CUDA graphs capture them (cuda_graphs.py).
    def before_attention(self, x, residual, rope):
        """((q, k, v), residual stream) of the layer's input."""
        h, residual = self.input_layernorm(x, residual)
        return self.self_attn.project(h, rope), residual

    def after_attention(self, attn, residual) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.post_attention_layernorm(self.self_attn.output(attn), residual)
        return self.mlp(h), residual


class DecoderLM(nn.Module):
    fused_decode = None  # CPU 4-bit models: every layer of small decode steps natively

    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.config = config
        self.backend = backend
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, backend)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of the tokens at `logits_indices` only."""
        x, residual = self.embed_tokens(input_ids), None
        if self.fused_decode is not None and self.fused_decode.fits(len(input_ids), meta):
            x, residual = self.fused_decode(x, positions, kv_caches, meta)
            return self.logits(x, residual, logits_indices)
        rope = self.rotary.at(positions)
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, cache, meta)
        return self.logits(x, residual, logits_indices)

    def logits(self, x: torch.Tensor, residual: torch.Tensor, logits_indices: torch.Tensor
               ) -> torch.Tensor:
        """Float32 logits of the rows at logits_indices of the last layer's output."""
        x, _ = self.norm(x[logits_indices], residual[logits_indices])
        return self.lm_head(x).float()

    def mark_sharded(self) -> None:
        """This is one tensor-parallel rank's shard: sum partial outputs across ranks."""
        for layer in self.layers:
            layer.self_attn.all_reduce = layer.mlp.all_reduce = True

    def use_fused_ops(self, fused: bool) -> None:
        """Triton kernels for RMSNorm, rotary and the MLP's activation (GPU), or torch ops."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, Rotary, MLP)):
                module.fused = fused
