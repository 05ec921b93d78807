"""`--kv-transfer object-store`: device -> pinned host memory on a side stream -> Ray's
object store as raw bytes -> the decode instance's device, off both engine threads."""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from sloserve.cluster.kv_transfer.base import Handoff, KVTransfer, TransferEvents, written_event
from sloserve.cluster.kv_transfer.link import to_engine_stream


class ObjectStoreTransfer(KVTransfer):
    def __init__(self, device: torch.device, events: TransferEvents):
        super().__init__(device, events)
        self._mover = KVMover(device)
        # device -> host -> object store, off the engine thread; one at a time, in order
        self._exporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-export")

    def export(self, handoff: Handoff, kv: torch.Tensor) -> None:
        handoff.exported_at = time.time()
        self._exporter.submit(self._put, handoff, kv, written_event(kv))

    def _put(self, handoff: Handoff, kv: torch.Tensor, ready) -> None:
        import ray

        try:
            handoff.kv = ray.put(self._mover.to_host(kv, ready))
        except Exception as e:  # the request cannot move on: tell the front end
            self.events.failed(handoff.request.request_id, f"KV export failed: {e}")
            return
        self.events.ready(handoff)

    def receive(self, peer: int, seq: int, handoff: Handoff) -> None:
        """Runs on an actor thread: staged on this device off the engine thread."""
        import ray

        try:
            handoff.kv = self._mover.to_device(ray.get(handoff.kv))
        except Exception:  # its prefill instance died with the object
            self.events.lost(handoff.request.request_id)
            return
        handoff.request.kv_transfer_time = time.time() - handoff.exported_at
        self.events.arrived(handoff)


class KVMover:
    """Moves KV between a GPU and the host on a side stream, so the copies never queue
    behind (or hold up) the engine's own kernels. On the CPU it only copies."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_host(self, kv: torch.Tensor, ready) -> WireKV:
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
                host.copy_(kv, non_blocking=True)
                self.stream.synchronize()
            kv = host
        return WireKV.pack(kv)

    def to_device(self, wire: WireKV) -> torch.Tensor:
        kv = wire.unpack()
        if self.stream is None:
            return kv.clone()  # the object store's memory is read-only and may be reused
        with torch.cuda.stream(self.stream):
            staged = kv.to(self.device, non_blocking=True)
            self.stream.synchronize()
        to_engine_stream(staged)
        return staged


@dataclass
class WireKV:
    """KV as raw bytes in a numpy array: Ray puts and gets numpy arrays without pickling
    (zero-copy from the object store on the same node), where a torch tensor is pickled and
    copied while holding the GIL, which stalled the decode instance's engine thread (p90
    TPOT 430-750 ms on two H200s with 6,000-token prompts)."""

    data: Any  # numpy uint8 array
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def pack(cls, kv: torch.Tensor) -> WireKV:
        kv = kv.contiguous()
        return cls(kv.view(torch.uint8).reshape(-1).numpy(), kv.dtype, tuple(kv.shape))

    def unpack(self) -> torch.Tensor:
        with warnings.catch_warnings():  # a read-only view, which is never written
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(self.data)
        return raw.view(self.dtype).reshape(self.shape)
