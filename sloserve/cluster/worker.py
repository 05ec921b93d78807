"""One engine instance inside a Ray actor: a prefill, decode or colocated role.

The actor's methods only queue work and collect results; a thread of the actor owns the
engine and steps it. A prefill instance runs a request until its first token, then copies the
request's KV blocks on its device, frees them and reports a handoff; the copy leaves over a
direct link (kv_link.py) or through Ray's object store; a decode instance imports such KV and
decodes to the end. The front end (cluster.py) calls `poll` in a loop to
collect what happened since its last call.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from sloserve.cluster.kv_link import KVLink, link_address, to_engine_stream
from sloserve.config import EngineConfig
from sloserve.core.latency import LatencyModel
from sloserve.core.router import InstanceLoad, tpot_slack
from sloserve.engine import LLMEngine
from sloserve.interface import RequestOutput
from sloserve.request import Request, RequestStatus

ROLES = ("prefill", "decode", "colocated")


class KVMover:
    """Moves handed-off KV between a GPU and the host on a side stream, so the copies never
    queue behind (or hold up) the engine's own kernels. On the CPU it only copies."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def snapshot(self, kv: torch.Tensor):
        """Called on the engine thread right after kv was produced: an event marking it."""
        if self.stream is None:
            return kv, None
        ready = torch.cuda.Event()
        ready.record()
        return kv, ready

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


@dataclass
class Handoff:
    """A prefilled request and where its KV waits: a Ray object ref, or (direct transfer) on
    the prefill's device until the front end names the decode instance it goes to."""

    request: Request
    kv: Any
    exported_at: float  # time.time() when the KV left: import time minus this = transfer
    shape: tuple[int, ...] = ()  # direct transfer: what the receiver allocates
    dtype: torch.dtype | None = None


@dataclass
class InstanceStats:
    load: InstanceLoad  # what routing reads (core/router.py)
    num_running: int
    num_waiting: int  # preempted ones and KV waiting for blocks included
    num_preempted: int
    num_blocks: int


@dataclass
class PollResult:
    outputs: list[RequestOutput] = field(default_factory=list)
    handoffs: list[Handoff] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (request id, message)
    lost: list[str] = field(default_factory=list)  # requests whose KV never arrived here
    stats: InstanceStats | None = None


class InstanceWorker:
    def __init__(self, role: str, config: EngineConfig,
                 kv_transfer: str = "object-store", latency_profile: str | None = None):
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        self.role = role
        self.kv_transfer = kv_transfer
        self._latency = (LatencyModel.from_file(latency_profile) if latency_profile
                         else LatencyModel.default())  # decode steps, for tpot_slack
        self._links: dict[int, KVLink] = {}  # direct transfer: peer instance -> link
        # direct: KV (and the event marking it written) waiting for its link
        self._outgoing: dict[str, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self.engine = LLMEngine(config)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._result = PollResult()
        self._changed = threading.Condition()
        self._imports: list[Handoff] = []  # KV that arrived before blocks were free
        self._snapshot = self._stats()  # written by the engine thread only
        self._mover = KVMover(self.engine.runner.device)
        # device -> host -> object store, off the engine thread; one at a time, in order
        self._exporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-export")
        threading.Thread(target=self._loop, name=f"sloserve-{role}", daemon=True).start()

    # ---- called by the front end (Ray actor methods) -------------------------------------
    def stats(self) -> InstanceStats:
        return self._snapshot

    def submit(self, request: Request) -> None:
        self._inbox.put(("add", request))

    def submit_prefilled(self, handoff: Handoff, kv) -> None:
        """kv: the handoff's KV, resolved by Ray from the object store before this call. It
        is staged on this instance's device here, off the engine thread."""
        handoff.kv = self._mover.to_device(kv)
        handoff.request.kv_transfer_time = time.time() - handoff.exported_at
        self._inbox.put(("import", handoff))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # ---- direct KV transfer (kv_link.py) ---------------------------------------------------
    def kv_link_address(self) -> tuple[str, int]:
        return link_address()

    def open_link(self, peer: int, rank: int, host: str, port: int) -> None:
        """Join a link with `peer` (replacing any earlier one: the peer was restarted)."""
        old = self._links.get(peer)
        self._links[peer] = KVLink(rank, host, port, self.engine.runner.device)
        if old is not None:
            old.close(RuntimeError(f"the link to instance {peer} was replaced"))

    def send_kv(self, peer: int, seq: int, request_id: str) -> None:
        """The receiving side reports a transfer that fails; this side lets the KV go."""
        (kv, ready), link = self._outgoing.pop(request_id), self._links[peer]
        link.post(seq, lambda: link.send(kv, ready), on_error=lambda e: None)

    def drop_kv(self, request_id: str) -> None:
        self._outgoing.pop(request_id, None)

    def receive_kv(self, peer: int, seq: int, handoff: Handoff) -> None:
        link = self._links[peer]
        settled = threading.Lock()  # a transfer given up as lost must not arrive after all

        def receive() -> None:
            kv = link.receive(handoff.shape, handoff.dtype)
            if settled.acquire(blocking=False):
                handoff.kv = kv
                handoff.request.kv_transfer_time = time.time() - handoff.exported_at
                self._inbox.put(("import", handoff))

        def lost(error: Exception) -> None:
            if settled.acquire(blocking=False):
                with self._changed:
                    self._result.lost.append(handoff.request.request_id)
                    self._changed.notify_all()

        link.post(seq, receive, lost)

    def poll(self, timeout: float = 0.05) -> PollResult:
        """What happened since the last poll; waits up to `timeout` for something."""
        with self._changed:
            r = self._result
            if not (r.outputs or r.handoffs or r.failures or r.lost):
                self._changed.wait(timeout)
            result, self._result = self._result, PollResult()
            result.stats = self._snapshot
            return result

    # ---- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._drain_inbox(block=not self.engine.has_unfinished() and not self._imports)
            self._retry_imports()
            self._snapshot = self._stats()
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a broken step fails its requests, not the instance
                self._fail_all(f"engine step failed: {e}")
                continue
            with self._changed:  # the first token goes out before its handoff does
                self._result.outputs.extend(outputs)
                self._changed.notify_all()
            if self.role == "prefill":
                self._hand_off(outputs)

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                op, arg = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if op == "add":
                try:
                    self.engine.submit(arg)
                except ValueError as e:
                    self._fail(arg.request_id, str(e))
            elif op == "import":
                self._imports.append(arg)
            else:
                self._imports = [h for h in self._imports if h.request.request_id != arg]
                self.engine.abort(arg)

    def _retry_imports(self) -> None:
        while self._imports:
            handoff = self._imports[0]
            try:
                if not self.engine.import_prefilled(handoff.request, handoff.kv):
                    return  # first come, first served: wait for blocks
            except ValueError as e:
                self._fail(handoff.request.request_id, str(e))
            self._imports.pop(0)

    def _hand_off(self, outputs: list[RequestOutput]) -> None:
        """Prefilled requests (first token out, not finished) leave for a decode instance:
        their KV is copied on the device and their blocks freed at once; the copy to the
        object store runs on the exporter thread (a side stream on a GPU)."""
        for out in outputs:
            request = self.engine.scheduler.get(out.request_id)
            if out.finished or request is None or request.status != RequestStatus.RUNNING:
                continue
            kv = self.engine.export_kv(request)
            handoff = request.handoff_copy()
            self.engine.abort(request.request_id)  # its blocks come back here
            kv, ready = self._mover.snapshot(kv)
            if self.kv_transfer == "direct":
                self._outgoing[request.request_id] = kv, ready
                self._report(Handoff(handoff, None, time.time(), tuple(kv.shape), kv.dtype))
            else:
                self._exporter.submit(self._export, handoff, kv, ready, time.time())

    def _export(self, request: Request, kv, ready, started: float) -> None:
        import ray

        try:
            ref = ray.put(self._mover.to_host(kv, ready))
        except Exception as e:  # the request cannot move on: tell the front end
            self._fail(request.request_id, f"KV export failed: {e}")
            return
        self._report(Handoff(request, ref, started))

    def _report(self, handoff: Handoff) -> None:
        with self._changed:
            self._result.handoffs.append(handoff)
            self._changed.notify_all()

    def _fail(self, request_id: str, message: str) -> None:
        with self._changed:
            self._result.failures.append((request_id, message))
            self._changed.notify_all()

    def _fail_all(self, message: str) -> None:
        for request_id in self.engine.scheduler.unfinished_ids():
            self.engine.abort(request_id)
            self._fail(request_id, message)

    def _stats(self) -> InstanceStats:
        scheduler, blocks = self.engine.scheduler, self.engine.blocks
        running = scheduler.running
        slack = tpot_slack(running, self.engine.clock(),
                           self._latency.decode_time(len(running))) \
            if self.role == "decode" else None  # only tropical routing reads it
        load = InstanceLoad(self.role, scheduler.queued_prompt_tokens(), blocks.num_free_blocks,
                            scheduler.num_unfinished + len(self._imports), slack,
                            self.engine.last_step_time)
        return InstanceStats(
            load, num_running=len(running),
            num_waiting=len(scheduler.waiting) + len(scheduler.preempted) + len(self._imports),
            num_preempted=len(scheduler.preempted), num_blocks=blocks.num_blocks)
