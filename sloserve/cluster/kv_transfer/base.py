"""The KVTransfer interface and the Handoff it moves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sloserve.request import Request


@dataclass
class Handoff:
    """A prefilled request on its way to a decode instance, and where its KV is: whatever the
    transfer put there (an object-store ref, or nothing while it waits on the prefill's
    device); on arrival, the KV on the decode instance's device."""

    request: Request
    kv: Any
    exported_at: float  # time.time() when the KV left: arrival time minus this = transfer
    shape: tuple[int, ...] = ()  # what a receiver allocates
    dtype: torch.dtype | None = None


@dataclass
class TransferEvents:
    """How a transfer tells its instance what happened (any thread may call these)."""

    ready: Callable[[Handoff], None]  # prefill side: the KV can leave; route the request
    failed: Callable[[str, str], None]  # prefill side: (request id, message)
    arrived: Callable[[Handoff], None]  # decode side: the KV is on this device
    lost: Callable[[str], None]  # decode side: this request's KV will never arrive


class KVTransfer:
    """One per engine instance. The prefill side `export`s a request's KV right after copying
    it off its blocks (engine thread) and, once the front end has named the decode instance,
    `send`s it; the decode side `receive`s it. Sends and receives of one prefill/decode pair
    carry the same sequence numbers, in the order the front end handed the requests over."""

    pairwise: ClassVar[bool] = False  # True: needs a link per pair (address / connect)

    def __init__(self, device: torch.device, events: TransferEvents):
        self.device, self.events = device, events

    def export(self, handoff: Handoff, kv: torch.Tensor) -> None:
        raise NotImplementedError

    def send(self, peer: int, seq: int, request_id: str) -> None:
        """Prefill side: the KV of `request_id` goes to instance `peer`."""

    def receive(self, peer: int, seq: int, handoff: Handoff) -> None:
        raise NotImplementedError

    def drop(self, request_id: str) -> None:
        """Prefill side: the request will never be sent (aborted, or no decode instance)."""

    def address(self) -> tuple[str, int]:
        """Prefill side of a pairwise transfer: where a new link's rendezvous will be."""
        raise NotImplementedError

    def connect(self, peer: int, rank: int, host: str, port: int) -> None:
        """Join (or replace) the link with instance `peer`; rank 0 is the prefill side."""
        raise NotImplementedError


def written_event(kv: torch.Tensor) -> torch.cuda.Event | None:
    """On the engine thread, right after `kv` was produced: an event that marks it written,
    for copies on other streams to wait on (None on the CPU)."""
    if not kv.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record()
    return event
