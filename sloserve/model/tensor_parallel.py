"""Tensor parallelism inside one engine instance (Megatron-style), one process per rank.

Attention heads and MLP columns are split over the ranks: q/k/v and gate/up projections by
output rows, o_proj and down_proj by input columns, each followed by an all-reduce; every rank
keeps the KV cache of its own KV heads. Embeddings, norms and lm_head are replicated. This
file only cuts the model; the rank processes and their step broadcast are sloserve.worker's.
"""

from __future__ import annotations

import dataclasses

import torch

from sloserve.model.config import ModelConfig


def local_config(config: ModelConfig, size: int) -> ModelConfig:
    """The shape one rank holds; raises ValueError when the model cannot be split so."""
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(config, name) % size:
            raise ValueError(f"tensor parallel size {size} does not divide the model's "
                             f"{name} ({getattr(config, name)})")
    return dataclasses.replace(config, num_heads=config.num_heads // size,
                               num_kv_heads=config.num_kv_heads // size,
                               intermediate_size=config.intermediate_size // size)


def shard_state(full: dict[str, torch.Tensor], config: ModelConfig, rank: int,
                size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of a full (fused-name) state dict."""
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    out = {}
    for name, t in full.items():
        if ".qkv_proj." in name:  # rows: [q | k | v], each split by heads
            parts = t.split([q, kv, kv])
            out[name] = torch.cat([p.chunk(size)[rank] for p in parts]).clone()
        elif ".gate_up_proj." in name:  # rows: [gate | up], each split
            out[name] = torch.cat([p.chunk(size)[rank] for p in t.chunk(2)]).clone()
        elif name.endswith(("o_proj.weight", "down_proj.weight")):  # split the input columns
            out[name] = t.chunk(size, dim=1)[rank].clone()
        else:
            out[name] = t
    return out
