"""Attention backends, picked by name. A backend is one module with one AttentionBackend
subclass; adding one is a new file and a line in BACKENDS. They load lazily: the Triton
backend needs triton, which a CPU-only install may lack."""

from __future__ import annotations

import importlib

import torch

from sloserve.model.attention.base import AttentionBackend, AttentionMetadata

BACKENDS = {  # name -> "module:class"
    "torch": "sloserve.model.attention.torch_paged:TorchPagedAttention",
    "triton": "sloserve.model.attention.triton_paged:TritonPagedAttention",
    "flash": "sloserve.model.attention.flash_paged:FlashPagedAttention",
}


def backend_names() -> list[str]:
    return ["auto", *BACKENDS]


def backend_class(name: str, device_type: str, dtype: torch.dtype = torch.float32,
                  block_size: int = 16) -> type[AttentionBackend]:
    """auto: on CUDA, FlashAttention 3 where vLLM's kernels are installed and the dtype is a
    16-bit one (prefill 8-28% faster than the Triton kernels at 4k-28k tokens on an H200,
    benchmarks/results/attention_backends.json), else the Triton kernels; pure torch
    elsewhere."""
    if name == "auto":
        name = "torch" if device_type != "cuda" else (
            "flash" if dtype in (torch.bfloat16, torch.float16) and block_size % 16 == 0
            and _flash_installed() else "triton")
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(backend_names())}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _flash_installed() -> bool:
    from sloserve.model.attention import flash_paged

    return flash_paged.flash_attn_varlen_func is not None


def make_backend(name: str, device_type: str, block_size: int,
                 dtype: torch.dtype = torch.float32) -> AttentionBackend:
    return backend_class(name, device_type, dtype, block_size)(block_size)


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "backend_names",
           "make_backend"]
