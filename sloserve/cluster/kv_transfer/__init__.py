"""How a prefilled request's KV reaches its decode instance (`--kv-transfer`), as vLLM's KV
connectors: one KVTransfer subclass per way, picked by name. Adding one is a new file and a
line in TRANSFERS; the worker and the front end only speak KVTransfer's methods."""

from __future__ import annotations

import importlib

from sloserve.cluster.kv_transfer.base import Handoff, KVTransfer

TRANSFERS = {  # name -> "module:class"; the names are config.KV_TRANSFERS
    "direct": "sloserve.cluster.kv_transfer.direct:DirectTransfer",
    "object-store": "sloserve.cluster.kv_transfer.object_store:ObjectStoreTransfer",
}


def transfer_class(name: str) -> type[KVTransfer]:
    if name not in TRANSFERS:
        raise ValueError(f"kv transfer must be one of {', '.join(TRANSFERS)}")
    module, cls = TRANSFERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Handoff", "KVTransfer", "TRANSFERS", "transfer_class"]
