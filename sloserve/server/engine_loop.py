"""The engine loop on its own thread, streaming outputs into asyncio queues.

The event loop never runs a model step: handlers validate and build requests, hand them to
the engine thread through an inbox, and await their outputs. The engine thread owns the
engine (any EngineClient); other threads only append to the inbox.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from sloserve.interface import EngineClient, RequestOutput
from sloserve.request import Request

log = logging.getLogger("sloserve.server")


class QueueFull(Exception):
    """The waiting queue is at its bound: answer 429 and let the client retry."""


class Rejected(Exception):
    """Admission control found the request's objective out of reach: answer 503."""


class TimedOut(Exception):
    """The request ran past the server's request timeout: answer 408."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput, or an Exception that ends the stream
    request: Request
    text: str = ""  # cumulative, where the engine sends only what is new (engine_process.py)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob, where asked for


def _coalesce(earlier: RequestOutput, later: RequestOutput | Exception
              ) -> RequestOutput | Exception:
    """Two outputs of one request as one (the later's state, both deltas' text)."""
    if isinstance(later, Exception):
        return later
    later.delta_text = earlier.delta_text + later.delta_text
    return later


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class EngineLoop:
    def __init__(self, engine: EngineClient, max_waiting: int = 1024,
                 on_finish: Callable[[RequestOutput], None] | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_finish = on_finish
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.running = False

    def start(self) -> None:
        """Run the engine loop on a new thread. A server process should rather call run()
        on its main thread: torch's CPU thread pool is markedly faster there."""
        self._thread = threading.Thread(target=self.run, name="sloserve-engine", daemon=True)
        self._thread.start()

    # ---- called from the event loop ----------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self.engine.stats().num_waiting + self._inbox.qsize()

    def add(self, request: Request, timeout: float | None = None
            ) -> AsyncIterator[RequestOutput]:
        """Queue a validated request; returns its output stream, which raises TimedOut once
        `timeout` seconds have passed. Raises QueueFull."""
        if self._stopping:
            raise QueueFull("the server is shutting down")
        if self.num_waiting >= self.max_waiting:
            raise QueueFull(f"{self.num_waiting} requests are already waiting")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), request)
        self._streams[request.request_id] = stream
        self._post("add", request)
        # One timer per request, not a wait_for per token: that made a task per token.
        timer = None if timeout is None else loop.call_later(
            timeout, stream.queue.put_nowait, TimedOut(f"request timed out after {timeout:g} s"))
        return self._iterate(request.request_id, stream, timer)

    async def _iterate(self, request_id: str, stream: _Stream,
                       timer: asyncio.TimerHandle | None) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await stream.queue.get()
                while not stream.queue.empty() and isinstance(item, RequestOutput) \
                        and not item.finished:  # (a timer's TimedOut may follow the last)
                    # the client fell behind by steps: one merged output, not a backlog
                    item = _coalesce(item, stream.queue.get_nowait())
                if isinstance(item, Exception):
                    raise item
                if item.finish_reason == "rejected":
                    raise Rejected(item.error)
                if item.error is not None:  # e.g. its instance died past recovery
                    raise RuntimeError(item.error)
                yield item
                if item.finished:
                    return
        finally:  # the consumer left early (disconnect, timeout): free the request
            if timer is not None:
                timer.cancel()
            if self._streams.pop(request_id, None) is not None:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left, end every stream with an error, and join the thread."""
        self._stopping = True
        self._post("stop", None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _post(self, op: str, arg: object) -> None:
        """Hand an operation to the engine's side: "add", "abort" or "stop"."""
        self._inbox.put((op, arg))
        self._wake.set()

    # ---- the engine thread -------------------------------------------------------------
    def run(self) -> None:
        """The engine loop; returns after stop()."""
        self.running = True
        try:
            self._loop()
        finally:
            self.running = False

    def _loop(self) -> None:
        while True:
            if not self._drain_inbox():
                break
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a broken step must not hang every client
                log.exception("engine step failed")
                self._fail_all(RuntimeError(f"engine step failed: {e}"))
                continue
            self._deliver(outputs)
        self._fail_all(RuntimeError("the server shut down before the request finished"))

    def _drain_inbox(self) -> bool:
        while True:
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if op == "stop":
                return False
            if op == "abort":
                self.engine.abort(arg)
            elif arg.request_id in self._streams:  # not abandoned before it got here
                try:
                    self.engine.submit(arg)
                except ValueError as e:
                    self._send(arg.request_id, e)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One wake-up of each event loop per step, not one per token: the loop and the
        engine share the GIL, and every wake-up costs the model step time."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            if out.finished and self.on_finish is not None \
                    and (out.error is None or out.finish_reason == "rejected"):
                self.on_finish(out)
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _send(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            self._send(request_id, error)
