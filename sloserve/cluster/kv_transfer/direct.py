"""`--kv-transfer direct`: a link per prefill/decode pair (link.py; NCCL between GPUs, gloo
between CPUs). The KV waits on the prefill's device until the front end names its decode
instance, then goes device to device."""

from __future__ import annotations

import threading
import time

import torch

from sloserve.cluster.kv_transfer.base import Handoff, KVTransfer, TransferEvents, written_event
from sloserve.cluster.kv_transfer.link import KVLink, link_address


class DirectTransfer(KVTransfer):
    pairwise = True

    def __init__(self, device: torch.device, events: TransferEvents):
        super().__init__(device, events)
        self._links: dict[int, KVLink] = {}  # peer instance -> link
        # KV (and the event marking it written) waiting for its link
        self._outgoing: dict[str, tuple[torch.Tensor, torch.cuda.Event | None]] = {}

    def export(self, handoff: Handoff, kv: torch.Tensor) -> None:
        self._outgoing[handoff.request.request_id] = kv, written_event(kv)
        handoff.shape, handoff.dtype, handoff.exported_at = tuple(kv.shape), kv.dtype, time.time()
        self.events.ready(handoff)

    def send(self, peer: int, seq: int, request_id: str) -> None:
        """The receiving side reports a transfer that fails; this side lets the KV go."""
        (kv, ready), link = self._outgoing.pop(request_id), self._links[peer]
        link.post(seq, lambda: link.send(kv, ready), on_error=lambda e: None)

    def drop(self, request_id: str) -> None:
        self._outgoing.pop(request_id, None)

    def receive(self, peer: int, seq: int, handoff: Handoff) -> None:
        link = self._links[peer]
        settled = threading.Lock()  # a transfer given up as lost must not arrive after all

        def receive() -> None:
            kv = link.receive(handoff.shape, handoff.dtype)
            if settled.acquire(blocking=False):
                handoff.kv = kv
                handoff.request.kv_transfer_time = time.time() - handoff.exported_at
                self.events.arrived(handoff)

        def lost(error: Exception) -> None:
            if settled.acquire(blocking=False):
                self.events.lost(handoff.request.request_id)

        link.post(seq, receive, lost)

    def address(self) -> tuple[str, int]:
        return link_address()

    def connect(self, peer: int, rank: int, host: str, port: int) -> None:
        old = self._links.get(peer)
        self._links[peer] = KVLink(rank, host, port, self.device)
        if old is not None:
            old.close(RuntimeError(f"the link to instance {peer} was replaced"))
