"""The OpenAI-compatible HTTP server."""

from __future__ import annotations

import logging
import signal
import threading

from sloserve.interface import EngineClient
from sloserve.server.app import ServerConfig, build_app

__all__ = ["ServerConfig", "build_app", "serve"]

log = logging.getLogger("sloserve.server")

# An idle keep-alive connection is closed after this long. It must outlast the expiry of the
# clients' pools (httpx and so the openai package: 5 s; proxies such as nginx: 60 s): at
# uvicorn's default of 5 s both sides close at once and a request sent on the closing
# connection is lost (the soak saw 2 httpx ReadErrors in 4,320 requests).
KEEP_ALIVE_S = 75


def serve(engine: EngineClient, config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM; then stop accepting, let in-flight requests finish for up
    to shutdown_timeout_s, abort the rest, and return.

    The engine loop runs on the main thread and the HTTP server on a second one: torch's CPU
    matmuls run about 25% faster from the main thread (benchmarks/server_overhead.py). With
    an engine_process.EngineProcess, the engine steps in its own process and the main
    thread only receives its outputs.
    """
    import uvicorn

    app = build_app(engine, config, engine_thread=False)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info",
        timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=config.shutdown_timeout_s))

    def shut_down(signum: int, _frame) -> None:
        log.info("received %s: draining", signal.Signals(signum).name)
        server.should_exit = True

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    http = threading.Thread(target=_run_http, args=(server, app), name="sloserve-http")
    http.start()
    app.state.loop.run()  # returns once the app's shutdown has stopped it
    http.join()
    if not server.started:
        raise OSError(f"could not serve on {config.host}:{config.port} (is the port taken?)")


def _run_http(server, app) -> None:
    try:
        server.run()
    finally:  # also when the HTTP server fails to start (port taken): release the engine
        app.state.loop.stop()
