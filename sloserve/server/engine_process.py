"""The engine in a process of its own, as vLLM's EngineCore: the HTTP server's event loop
and the engine's steps never share a GIL.

With the engine on a thread of the server's process, every streamed token's trip through
asyncio, JSON and the socket took the GIL from the step that was preparing the next batch:
served TPOT on the GPU was 3-5x the engine's own step time. Here the server process keeps
the HTTP side, tokenization and the per-request bookkeeping; the engine process runs the
step loop and sends, once per step, the new tokens and text of every request that moved.

    server process                                   engine process
    EngineProcess (RequestIntake: tokenize, check)   build(arg) -> engine, warm up
    ProcessEngineLoop  --("add"|"abort"|"stop")-->   EngineCore: drain, step
                       <--("out", stats, deltas)--
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from sloserve.engine import OverlappedSteps, RequestIntake
from sloserve.interface import EngineClient, EngineStats, RequestOutput, RequestTimings
from sloserve.request import Request, TokenLogprob
from sloserve.server.engine_loop import EngineLoop, _put_all

log = logging.getLogger("sloserve.server")


@dataclass(frozen=True)
class EngineInfo:
    """What the server process needs to validate requests the way the engine would."""

    model_name: str
    max_model_len: int
    model_config: Any
    tokenizer: Any
    eos_token_id: int | None
    num_blocks: int
    block_size: int

    @classmethod
    def of(cls, engine: Any) -> EngineInfo:
        return cls(engine.model_name, engine.max_model_len, engine.model_config,
                   engine.tokenizer, engine.eos_token_id, engine.blocks.num_blocks,
                   engine.blocks.block_size)


# One request's progress in a step: (id, new token ids, new text, finished, finish reason,
# RequestTimings' fields, error). Cumulative text and tokens are rebuilt on the server side.
# Plain tuples: pickling a dataclass calls dataclasses.fields() each time, which cost more
# than the rest of the message (~5 us a request a step).
Delta = tuple[str, list[int], str, bool, str | None, tuple, str | None,
              list[TokenLogprob] | None]


class EngineProcess(RequestIntake):
    """Starts the engine process (`build(arg)` runs there) and waits until it is warm; then
    validates requests as the engine would. `engine_loop()` gives the loop that talks to it."""

    def __init__(self, build: Callable[[Any], EngineClient], arg: Any, warm_up: bool = True):
        ctx = mp.get_context("spawn")  # CUDA cannot be forked, and the parent never needs it
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_engine_main, args=(child, build, arg, warm_up),
                                   name="sloserve-engine", daemon=True)
        self.process.start()
        child.close()
        kind, payload = self._receive_hello()
        if kind == "failed":
            self.process.join()
            raise ValueError(payload)
        info: EngineInfo = payload
        self.model_name, self.max_model_len = info.model_name, info.max_model_len
        self.model_config, self.tokenizer = info.model_config, info.tokenizer
        self.eos_token_id = info.eos_token_id
        self.num_blocks, self.block_size = info.num_blocks, info.block_size
        self.clock = time.monotonic  # system-wide: the engine process reads the same clock
        self._ids = itertools.count()
        self.latest_stats = EngineStats(0, 0, 0, 0.0)

    def _receive_hello(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join()
            raise ValueError(f"the engine process exited with code {self.process.exitcode} "
                             "while starting") from None

    def check(self, request: Request) -> None:
        if -(-(request.num_prompt_tokens + 1) // self.block_size) > self.num_blocks:
            raise ValueError(f"prompt of {request.num_prompt_tokens} tokens needs more KV "
                             f"blocks than the cache has ({self.num_blocks})")

    def stats(self) -> EngineStats:
        return self.latest_stats

    def engine_loop(self, max_waiting: int,
                    on_finish: Callable[[RequestOutput], None] | None) -> ProcessEngineLoop:
        return ProcessEngineLoop(self, max_waiting, on_finish)

    def shutdown(self) -> None:
        """Wait for the engine process to end (the loop's stop() asked it to)."""
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class ProcessEngineLoop(EngineLoop):
    """EngineLoop's streams, fed by the engine process: run() receives its messages."""

    def __init__(self, engine: EngineProcess, max_waiting: int,
                 on_finish: Callable[[RequestOutput], None] | None):
        super().__init__(engine, max_waiting, on_finish)
        self._conn, self._send_lock = engine.conn, threading.Lock()
        self._adds_sent = self._adds_taken = 0

    @property
    def num_waiting(self) -> int:
        return self.engine.latest_stats.num_waiting + self._adds_sent - self._adds_taken

    def _post(self, op: str, arg: object) -> None:
        with self._send_lock:
            if op == "add":
                self._adds_sent += 1
            try:
                self._conn.send((op, arg))
            except OSError:  # the engine process is gone: run() fails the streams
                pass

    def run(self) -> None:
        self.running = True
        try:
            while True:
                try:
                    kind, *payload = self._conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "out":
                    self._receive(*payload)
        finally:  # from now on add() refuses, rather than queue for a process that is gone
            self.running, self._stopping = False, True
            self._fail_streams(RuntimeError("the engine process stopped before the request "
                                            "finished"))

    def _receive(self, stats: tuple, adds_taken: int, deltas: list[Delta]) -> None:
        self.engine.latest_stats, self._adds_taken = EngineStats(*stats), adds_taken
        by_loop: dict[Any, list] = {}
        for rid, new_tokens, delta_text, finished, reason, timings, error, logprobs in deltas:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            stream.text += delta_text
            stream.token_ids.extend(new_tokens)
            if logprobs is not None:
                stream.logprobs.extend(logprobs)
            request = stream.request
            out = RequestOutput(rid, request.prompt_token_ids, stream.text, delta_text,
                                stream.token_ids, finished, reason, RequestTimings(*timings),
                                request.slo, error,
                                stream.logprobs if logprobs is not None else None)
            if finished and self.on_finish is not None and (error is None
                                                            or reason == "rejected"):
                self.on_finish(out)
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_streams(self, error: Exception) -> None:
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._post("stop", None)


# ---- the engine process ---------------------------------------------------------------------
def _engine_main(conn: Connection, build: Callable[[Any], Any], arg: Any,
                 warm_up: bool) -> None:
    # The server process decides when to stop (a process group's SIGTERM, as systemd and
    # Ctrl-C send, must not kill the steps that in-flight requests wait for); if it dies,
    # the pipe's end stops this loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = build(arg)
    except Exception as e:  # a bad model path, an unknown setting: one line to the user
        conn.send(("failed", str(e)))
        return
    try:
        if warm_up:
            warm_up_engine(engine)
        conn.send(("ready", EngineInfo.of(engine)))
        _run_profiled(EngineCore(engine, conn).run, os.environ.get("SLOSERVE_ENGINE_PROFILE"))
    finally:
        engine.shutdown()


def _run_profiled(run: Callable[[], None], path: str | None) -> None:
    """SLOSERVE_ENGINE_PROFILE=FILE: cProfile the engine process's loop into FILE (pstats),
    to see where a step's host time goes (benchmarks/vllm_compare.py --profile-engine)."""
    if not path:
        return run()
    import cProfile

    profiler = cProfile.Profile()
    try:
        profiler.runcall(run)
    finally:
        profiler.dump_stats(path)


def warm_up_engine(engine: Any) -> None:
    """Run two short requests through every kind of step (batched prefill, decode), so that
    kernels compile and caches fill before the first client's request, not during it; then
    hand the scheduler over fresh, so that no policy learns from these steps."""
    from sloserve.request import SamplingParams

    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    vocab = engine.model_config.vocab_size
    for i, length in enumerate((7, 33)):
        engine.add_request([(100 + 7 * i + j) % vocab for j in range(length)], params,
                           request_id=f"warm-up-{i}")
    while engine.has_unfinished():
        engine.step()
    engine.reset_scheduler()


class EngineCore:
    """The engine process's loop: take the server's messages, step, send what moved."""

    def __init__(self, engine: Any, conn: Connection):
        self.engine, self.conn = engine, conn
        self.adds_taken = 0
        self.sent_tokens: dict[str, int] = {}  # request id -> tokens already sent

    def run(self) -> None:
        steps = OverlappedSteps(self.engine)  # step N's outputs go out while N+1 runs
        while self._take_messages(block=not steps.has_work()):
            if not steps.has_work():
                continue
            try:
                outputs = steps.step()
            except Exception as e:  # a broken step must not hang every client
                log.exception("engine step failed")
                steps.abandon()
                self._fail_all(f"engine step failed: {e}")
                continue
            self._send(outputs)
        self._fail_all("the server shut down before the request finished")

    def _take_messages(self, block: bool) -> bool:
        """Apply every waiting message (wait for one first when idle); False on stop."""
        changed = False
        try:
            if block:
                self.conn.poll(None)
            while self.conn.poll(0):
                op, arg = self.conn.recv()
                if op == "stop":
                    return False
                changed = True
                if op == "abort":
                    self.engine.abort(arg)
                    self.sent_tokens.pop(arg, None)
                else:
                    self._submit(arg)
        except (EOFError, OSError):  # the server process is gone
            return False
        if changed:
            self._send([])  # fresh stats: an abort may have freed the whole cache
        return True

    def _submit(self, request: Request) -> None:
        self.adds_taken += 1
        try:
            self.engine.submit(request)
        except ValueError as e:
            self._send([], [self._failure(request.request_id, str(e))])
            return
        self.sent_tokens[request.request_id] = 0

    def _send(self, outputs: list[RequestOutput], extra: list[Delta] = ()) -> None:
        deltas = list(extra)
        for out in outputs:
            sent = self.sent_tokens.get(out.request_id, 0)
            t = out.timings
            deltas.append((out.request_id, out.token_ids[sent:], out.delta_text, out.finished,
                           out.finish_reason, (t.arrival, t.first_scheduled, t.first_token,
                                               t.finish, t.tpot, t.kv_transfer), out.error,
                           None if out.logprobs is None else out.logprobs[sent:]))
            if out.finished:
                self.sent_tokens.pop(out.request_id, None)
            else:
                self.sent_tokens[out.request_id] = len(out.token_ids)
        s = self.engine.stats()
        self.conn.send(("out", (s.num_running, s.num_waiting, s.num_preempted, s.kv_cache_usage),
                        self.adds_taken, deltas))

    def _fail_all(self, message: str) -> None:
        for rid in list(self.sent_tokens):
            self.engine.abort(rid)
        deltas = [self._failure(rid, message) for rid in self.sent_tokens]
        self.sent_tokens.clear()
        try:
            self._send([], deltas)
        except OSError:
            pass

    @staticmethod
    def _failure(request_id: str, message: str) -> Delta:
        return (request_id, [], "", True, "error", (time.monotonic(),) + (None,) * 5, message,
                None)
