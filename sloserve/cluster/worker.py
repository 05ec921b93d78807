"""One engine instance inside a Ray actor: a prefill, decode or colocated role.

The actor's methods only queue work and collect results; a thread of the actor owns the
engine and steps it. A prefill instance runs a request until its first token, then copies the
request's KV blocks on its device, frees them and hands the copy to its KV transfer
(kv_transfer/); a decode instance expects the request at once (it waits in the scheduler as
WAITING_FOR_REMOTE_KV) and decodes it to the end once its KV has arrived. The front end
(frontend.py) calls `poll` in a loop to collect what happened since its last call.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from sloserve.cluster.kv_transfer import Handoff, transfer_class
from sloserve.cluster.kv_transfer.base import TransferEvents
from sloserve.config import EngineConfig
from sloserve.core.latency import LatencyModel
from sloserve.core.router import InstanceLoad, instance_load
from sloserve.engine import LLMEngine
from sloserve.interface import RequestOutput
from sloserve.profiler import calibrate
from sloserve.request import Request, RequestStatus

ROLES = ("prefill", "decode", "colocated")


@dataclass
class InstanceStats:
    load: InstanceLoad  # what routing reads (core/router.py)
    num_running: int
    num_waiting: int  # preempted ones and those whose KV is on its way included
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
    def __init__(self, role: str, config: EngineConfig, kv_transfer: str = "object-store",
                 latency_profile: str | None = None):
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        self.role = role
        self._latency = (LatencyModel.from_file(latency_profile) if latency_profile
                         else LatencyModel.default())  # decode steps, for tpot_slack
        self.engine = LLMEngine(config)
        calibrate(self.engine)
        self.transfer = transfer_class(kv_transfer)(self.engine.runner.device, TransferEvents(
            ready=self._report, failed=self._fail, arrived=self._arrived, lost=self._lost))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._result = PollResult()
        self._changed = threading.Condition()
        self._snapshot = self._stats()  # written by the engine thread only
        threading.Thread(target=self._loop, name=f"sloserve-{role}", daemon=True).start()

    # ---- called by the front end (Ray actor methods) -------------------------------------
    def stats(self) -> InstanceStats:
        return self._snapshot

    def submit(self, request: Request) -> None:
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def send_kv(self, peer: int, seq: int, request_id: str) -> None:
        self.transfer.send(peer, seq, request_id)

    def drop_kv(self, request_id: str) -> None:
        self.transfer.drop(request_id)

    def receive_kv(self, peer: int, seq: int, handoff: Handoff) -> None:
        """A request prefilled on `peer` is now this instance's: it waits in the scheduler
        while its KV travels."""
        self._inbox.put(("expect", handoff.request))
        self.transfer.receive(peer, seq, handoff)

    def kv_link_address(self) -> tuple[str, int]:
        return self.transfer.address()

    def open_link(self, peer: int, rank: int, host: str, port: int) -> None:
        self.transfer.connect(peer, rank, host, port)

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
            self._drain_inbox(block=not self.engine.has_runnable())
            self._snapshot = self._stats()
            if not self.engine.has_runnable():
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
            try:
                if op == "add":
                    self.engine.submit(arg)
                elif op == "expect":
                    self.engine.expect_remote(arg)
                elif op == "arrived":
                    self.engine.kv_arrived(arg.request.request_id, arg.kv)
                else:
                    self.engine.abort(arg)
            except ValueError as e:  # a request that could never run here
                self._fail(arg.request_id, str(e))

    def _hand_off(self, outputs: list[RequestOutput]) -> None:
        """Prefilled requests (first token out, not finished) leave for a decode instance:
        their KV is copied on the device and their blocks freed at once; the transfer takes
        the copy from there."""
        for out in outputs:
            request = self.engine.scheduler.get(out.request_id)
            if out.finished or request is None or request.status != RequestStatus.RUNNING:
                continue
            kv = self.engine.export_kv(request)
            handoff = Handoff(request.handoff_copy(), None, 0.0)
            self.engine.abort(request.request_id)  # its blocks come back here
            self.transfer.export(handoff, kv)

    # ---- events (any thread) -------------------------------------------------------------
    def _arrived(self, handoff: Handoff) -> None:
        self._inbox.put(("arrived", handoff))

    def _lost(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        with self._changed:
            self._result.lost.append(request_id)
            self._changed.notify_all()

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
        scheduler, running = self.engine.scheduler, self.engine.scheduler.running
        load = instance_load(self.role, scheduler, self.engine.clock(),
                             self._latency.decode_time(len(running)),
                             self.engine.last_step_time)
        return InstanceStats(
            load, num_running=len(running),
            num_waiting=len(scheduler.waiting) + len(scheduler.preempted) + len(scheduler.remote),
            num_preempted=len(scheduler.preempted), num_blocks=scheduler.blocks.num_blocks)
