"""Attention backends, picked by name. A backend is one module with one AttentionBackend
subclass; adding one is a new file and a line in BACKENDS. They load lazily: the Triton
backend needs triton, which a CPU-only install may lack."""

from __future__ import annotations

import importlib

from sloserve.model.attention.base import AttentionBackend, AttentionMetadata

BACKENDS = {  # name -> "module:class"
    "torch": "sloserve.model.attention.torch_paged:TorchPagedAttention",
    "triton": "sloserve.model.attention.triton_paged:TritonPagedAttention",
    "flash": "sloserve.model.attention.flash_paged:FlashPagedAttention",
}


def backend_names() -> list[str]:
    return ["auto", *BACKENDS]


def backend_class(name: str, device_type: str) -> type[AttentionBackend]:
    """auto: Triton kernels on CUDA, pure torch elsewhere."""
    if name == "auto":
        name = "triton" if device_type == "cuda" else "torch"
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(backend_names())}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(name: str, device_type: str, block_size: int) -> AttentionBackend:
    return backend_class(name, device_type)(block_size)


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "backend_names",
           "make_backend"]
