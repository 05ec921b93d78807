"""A direct KV channel between one prefill and one decode instance (`--kv-transfer direct`).

A two-process torch.distributed group of its own (NCCL between GPUs, gloo between CPUs; it
does not touch the instances' tensor-parallel groups): the prefill side sends a request's KV
from its device, the decode side receives it straight into its device. Sends and receives must
pair up in the same order on both sides, so the front end numbers each link's handoffs and each
side runs them strictly in that order on the link's own thread, never on an engine thread.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist

log = logging.getLogger("sloserve.cluster")

TIMEOUT = datetime.timedelta(seconds=120)
JOB_TIMEOUT_S = 60.0  # a transfer takes milliseconds; one this late has lost its peer
OnError = Callable[[Exception], None]


def link_address() -> tuple[str, int]:
    """Where a prefill instance will host a new link's rendezvous."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


class KVLink:
    def __init__(self, rank: int, host: str, port: int, device: torch.device,
                 job_timeout_s: float = JOB_TIMEOUT_S):
        self.rank = rank  # 0: the prefill side (sends), 1: the decode side (receives)
        self.device = device
        self.job_timeout_s = job_timeout_s
        self._jobs: dict[int, tuple[Callable[[], None], OnError]] = {}
        self._next = 0
        self._ready = threading.Condition()
        self._broken: Exception | None = None  # set once: every job after fails with it
        self._group = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        threading.Thread(target=self._run, args=(host, port), daemon=True,
                         name=f"kv-link-{rank}").start()

    def post(self, seq: int, job: Callable[[], None], on_error: OnError) -> None:
        """Run `job` once every job numbered below `seq` has run; if the link breaks first
        (or `job` raises), `on_error(the error)` runs instead, on some thread."""
        with self._ready:
            broken = self._broken
            if broken is None:
                self._jobs[seq] = job, on_error
                self._ready.notify_all()
        if broken is not None:
            on_error(broken)

    def close(self, error: Exception) -> None:
        """Fail every job not yet started (a link replaced after its peer restarted)."""
        with self._ready:
            self._broken = self._broken or error
            failed, self._jobs = list(self._jobs.values()), {}
            self._ready.notify_all()
        for _, on_error in failed:
            on_error(self._broken)

    def send(self, kv: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        """ready: an event recorded after kv was written (None on the CPU)."""
        with self._on_stream():
            if ready is not None:
                self._stream.wait_event(ready)
            self._group.send([kv], 1, 0).wait()
            self._finish()

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._on_stream():
            kv = torch.empty(shape, dtype=dtype, device=self.device)
            self._group.recv([kv], 0, 0).wait()
            self._finish()
        if self._stream is not None:  # the engine reads it on its stream: see to_engine_stream
            to_engine_stream(kv)
        return kv

    # NCCL work waits on the stream current at the call: on the engine's stream a send would
    # hold the engine's next kernels until the peer receives. The link's own stream keeps the
    # engines apart, and synchronizing it (this thread only) makes the transfer's time real.
    def _on_stream(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()

    def _finish(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _connect(self, host: str, port: int) -> None:
        store = dist.TCPStore(host, port, 2, self.rank == 0, timeout=TIMEOUT)
        if self.device.type == "cuda":
            self._group = dist.ProcessGroupNCCL(store, self.rank, 2)
        else:
            self._group = dist.ProcessGroupGloo(store, self.rank, 2, TIMEOUT)

    def _run(self, host: str, port: int) -> None:
        try:
            self._connect(host, port)  # blocks until the other side has joined
        except Exception as e:  # the peer never came: nothing can move here
            self.close(e)
            return
        while True:
            with self._ready:
                while self._next not in self._jobs and self._broken is None:
                    self._ready.wait()
                if self._broken is not None:
                    return
                job, on_error = self._jobs.pop(self._next)
                self._next += 1
            if not self._run_job(job, once(on_error)):
                return

    def _run_job(self, job: Callable[[], None], on_error: OnError) -> bool:
        """Whether the link still works after `job`. NCCL notices a dead peer only when its
        watchdog gives up (10 minutes by default), so a job past job_timeout_s breaks the link
        at once: its requests resume elsewhere while this thread stays stuck in NCCL."""
        def expire() -> None:
            error = TimeoutError(f"KV transfer took over {self.job_timeout_s:g} s")
            on_error(error)
            self.close(error)

        watchdog = threading.Timer(self.job_timeout_s, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            job()
        except Exception as e:  # the peer died: the link is dead for good
            log.warning("KV link (rank %d) failed: %s", self.rank, e)
            on_error(e)
            self.close(e)
        finally:
            watchdog.cancel()
        with self._ready:
            return self._broken is None


def once(on_error: OnError) -> OnError:
    """on_error that acts on its first call only (a job can both time out and fail)."""
    called = threading.Lock()

    def call(error: Exception) -> None:
        if called.acquire(blocking=False):
            on_error(error)

    return call


def to_engine_stream(kv: torch.Tensor) -> None:
    """kv was allocated on a side stream and is read by the engine on the default stream:
    without this, its memory could be handed to the side stream's next allocation while the
    engine's import kernels are still queued to read it."""
    kv.record_stream(torch.cuda.default_stream(kv.device))
