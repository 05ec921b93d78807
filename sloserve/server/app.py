"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics, and the live SLO page /dashboard."""

from __future__ import annotations

import asyncio
import functools
import hmac
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from sloserve.interface import EngineClient, Prompt, RequestOutput
from sloserve.model import structured
from sloserve.request import SLO
from sloserve.server.engine_loop import EngineLoop, QueueFull, Rejected, TimedOut
from sloserve.server.live import LiveWindow
from sloserve.server.metrics import ServerMetrics
from sloserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationBody,
    error_body,
)
from sloserve.server.tools import ToolMode, ToolStream

STATIC = Path(__file__).parent / "static"
INTAKE_TIMEOUT_S = 10.0  # validating one request (tokenizing, compiling its grammar)
DASHBOARD_ASSETS = ("uplot.iife.min.js", "uplot.min.css")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # Bearer token required on /v1/* when set
    max_waiting: int = 1024  # waiting requests beyond this get 429
    request_timeout_s: float = 600.0  # a request still running after this is aborted
    served_model_name: str | None = None  # None: the model's own name
    default_slo: SLO = field(default_factory=SLO)  # objectives for requests that send none
    shutdown_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may finish
    max_tokens_default: int = 1024  # a request that sends no max_tokens gets at most this
    # temperature / top_p / top_k for requests that omit them (serve --generation-config)
    generation_defaults: dict[str, float] = field(default_factory=dict)
    policy: str = ""  # the scheduling policy's name, shown on the live page


class APIError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type = status, message, err_type
        self.param, self.headers = param, headers


def error_response(status: int, message: str, err_type: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, err_type, status, param), status_code=status,
                        headers=headers)


def build_app(engine: EngineClient, config: ServerConfig, engine_thread: bool = True
              ) -> FastAPI:
    """The app; its startup starts the engine loop on a thread unless `engine_thread` is
    False, in which case the caller runs `app.state.loop.run()` itself."""
    model_name = config.served_model_name or engine.model_name
    metrics = ServerMetrics(engine, model_name)
    live = LiveWindow(config.policy)

    def on_finish(out: RequestOutput) -> None:
        metrics.record(out)
        live.record(out)

    # An engine in its own process (engine_process.EngineProcess) brings its own loop.
    make_loop = getattr(engine, "engine_loop", functools.partial(EngineLoop, engine))
    loop = make_loop(config.max_waiting, on_finish=on_finish)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine_thread:
            loop.start()
        yield
        loop.stop()

    app = FastAPI(title="sloserve", version="0.1.0", lifespan=lifespan)
    app.state.loop = loop
    _install_error_handlers(app)
    _install_auth(app, config.api_key)
    handler = _Handler(engine, loop, config, model_name)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if loop.running else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        return FileResponse(STATIC / "dashboard.html")

    @app.get("/dashboard/data")
    async def dashboard_data() -> dict:
        """The live page's numbers: the last minute of finished requests per SLO class."""
        return {"model": model_name, **live.snapshot(engine.stats())}

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_asset(name: str) -> Response:
        if name not in DASHBOARD_ASSETS:
            raise APIError(404, f"no such file: {name}")
        return FileResponse(STATIC / name)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": handler.started,
            "owned_by": "sloserve", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await handler.generate(body, _completion_prompts(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        if not body.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        messages = _or_400(body.chat, "tool_choice")
        return await handler.generate(body, [messages], chat=True)

    return app


def _completion_prompts(body: CompletionRequest) -> list[Prompt]:
    if body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return list(prompt)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.err_type, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        problems, params = [], []
        for err in e.errors():
            if err.get("type") == "json_invalid":
                problems.append(f"malformed JSON: {err.get('msg')}")
                continue
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{loc or 'body'}: {err.get('msg')}")
            params.append(loc or None)
        param = params[0] if params else None
        return error_response(400, "; ".join(problems), "invalid_request_error", param)

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {e}", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "invalid_request_error")


def _install_auth(app: FastAPI, api_key: str | None) -> None:
    if not api_key:
        return

    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        # compare_digest: the time taken must not tell how much of a guess was right
        if request.url.path.startswith("/v1") and not hmac.compare_digest(given, expected):
            return error_response(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)


class _Handler:
    """Turns a request body into engine requests and their outputs into OpenAI responses."""

    def __init__(self, engine: EngineClient, loop: EngineLoop, config: ServerConfig,
                 model_name: str):
        self.engine, self.loop, self.config = engine, loop, config
        self.model_name = model_name
        self.started = int(time.time())
        # one thread: requests are validated in arrival order, the tokenizer never shared
        self.intake = ThreadPoolExecutor(1, thread_name_prefix="intake")

    @functools.lru_cache(maxsize=65536)
    def _token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    async def generate(self, body: GenerationBody, prompts: list[Prompt], chat: bool):
        if body.model not in (None, self.model_name):
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model")
        requests = await self._intake(body, prompts)
        streams = self._submit(requests, self.config.request_timeout_s)
        base = _ResponseBase(
            ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time()),
            self.model_name, chat, self._token_text,
            body.tool_mode() if isinstance(body, ChatCompletionRequest) else None)
        merged = await _first_answer(_merge(streams))
        firsts = requests[:: body.n]  # one request per prompt, for prompt token counts
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(base.sse(merged, firsts, include_usage),
                                     media_type="text/event-stream")
        return await base.collect(merged, firsts)

    async def _intake(self, body: GenerationBody, prompts: list[Prompt]) -> list:
        """Validate, tokenize and compile constraints on the intake thread, not the event
        loop: a long prompt or a costly grammar must not stall every other stream."""
        work = asyncio.get_running_loop().run_in_executor(
            self.intake, functools.partial(self._make_requests, body, prompts))
        try:
            return await asyncio.wait_for(asyncio.shield(work), INTAKE_TIMEOUT_S)
        except TimeoutError:
            raise APIError(400, f"the request took more than {INTAKE_TIMEOUT_S:g} s to "
                                f"validate (a prompt or constraint too costly)") from None

    def _make_requests(self, body: GenerationBody, prompts: list[Prompt]) -> list:
        slo = _or_400(lambda: body.slo_with_defaults(self.config.default_slo), "slo")
        constraint = _or_400(body.constraint, "response_format")
        _or_400(lambda: structured.check(constraint), "response_format")
        requests, rid = [], uuid.uuid4().hex[:16]
        for p_index, prompt in enumerate(prompts):
            tokens = _or_400(lambda: self.engine.tokenize(prompt), "prompt")
            max_tokens = self._max_tokens(body, len(tokens))
            for i in range(body.n):
                params = _or_400(lambda: body.sampling_params(
                    max(max_tokens, 1), i, self.config.generation_defaults, constraint), None)
                requests.append(_or_400(lambda: self.engine.make_request(
                    tokens, params, slo, f"{rid}-{p_index * body.n + i}",
                    priority=body.priority), "prompt", ("logit_bias",)))
        return requests

    def _max_tokens(self, body: GenerationBody, prompt_len: int) -> int:
        """As vLLM: a cap past the context is a 400 naming both sizes, never silently
        accepted; no cap: the server's default (--max-tokens-default), within the context."""
        room = self.engine.max_model_len - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is "
                                f"{self.engine.max_model_len} tokens, with room for at least "
                                f"one more", param="prompt")
        asked = body.requested_max_tokens()
        if asked is None:
            return max(1, min(room, self.config.max_tokens_default))
        if asked > room:
            raise APIError(400, f"this model's context is {self.engine.max_model_len} tokens; "
                                f"the prompt has {prompt_len}, so max_tokens can be at most "
                                f"{max(room, 0)}, not {asked}", param="max_tokens")
        return asked

    def _submit(self, requests: list, timeout: float) -> list[AsyncIterator[RequestOutput]]:
        streams = []
        try:
            for request in requests:
                streams.append(self.loop.add(request, timeout))
        except QueueFull as e:
            for request in requests[: len(streams)]:
                self.loop.abort(request.request_id)
            raise APIError(429, f"server busy: {e}", "rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        return streams


def _or_400(build, param: str | None, named: tuple[str, ...] = ()):
    """build(), with a ValueError as a 400 naming `param`, or the field of `named` that the
    message starts with."""
    try:
        return build()
    except ValueError as e:
        param = next((n for n in named if str(e).startswith(n)), param)
        raise APIError(400, str(e), param=param) from None


async def _first_answer(merged: AsyncIterator) -> AsyncIterator:
    """Wait for the first output before any reply is sent, so that a request admission
    control turns away gets a 503 (with Retry-After), not a stream that ends in an error."""
    try:
        first = await anext(merged)
    except StopAsyncIteration:
        first = None
    except Rejected as e:
        await merged.aclose()
        raise APIError(503, f"objective out of reach: {e}", "service_unavailable",
                       headers={"Retry-After": "1"}) from None

    async def replay() -> AsyncIterator:
        try:
            if first is not None:
                yield first
            async for item in merged:
                yield item
        finally:
            await merged.aclose()

    return replay()


async def _merge(streams: list[AsyncIterator[RequestOutput]]
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several requests as they come, tagged by choice index."""
    try:
        if len(streams) == 1:  # the common case: no task and queue hop per token
            try:
                async for out in streams[0]:
                    yield 0, out
            finally:  # closing the stream aborts its request if it has not finished
                await streams[0].aclose()
            return
        async for item in _interleave(streams):
            yield item
    except TimedOut as e:
        raise APIError(408, str(e), "timeout") from None


async def _interleave(streams: list[AsyncIterator[RequestOutput]]
                      ) -> AsyncIterator[tuple[int, RequestOutput]]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((index, out))
        except Exception as e:
            await queue.put((index, e))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:  # cancelling a pump closes its stream, which aborts the request
        for task in tasks:
            task.cancel()


@dataclass
class _ResponseBase:
    id: str
    created: int
    model: str
    chat: bool
    token_text: Callable[[int], str]
    tools: ToolMode | None = None  # chat with tools: calls parsed out of the reply

    def _envelope(self, choices: list, usage: dict | None = None, chunk: bool = False) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if chunk and self.chat else "")
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def _choice(self, index: int, text: str | None, out: RequestOutput | None, delta: bool,
                first_token: int = 0, text_offset: int = 0,
                tool_calls: list[dict] | None = None) -> dict:
        """`first_token`: where this choice's new tokens start in `out` (for logprobs), at
        `text_offset` characters into the reply."""
        finish = out.finish_reason if out is not None and out.finished else None
        if tool_calls and finish == "stop":
            finish = "tool_calls"
        logprobs = None
        if out is not None and out.logprobs is not None:
            logprobs = self._logprobs(out.token_ids[first_token:],
                                      out.logprobs[first_token: len(out.token_ids)], text_offset)
        if self.chat:
            content = {"role": "assistant", "content": text or None if tool_calls else text}
            if tool_calls:
                content["tool_calls"] = [{**c, "index": i} for i, c in enumerate(tool_calls)] \
                    if delta else tool_calls
            choice = {"index": index, ("delta" if delta else "message"): content}
            if logprobs is not None:
                choice["logprobs"] = logprobs
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs}
        choice["finish_reason"] = finish
        if finish is not None:
            choice["timings"] = out.timings.as_ms(out.slo)
        return choice

    def _logprobs(self, token_ids: list[int], logprobs: list, text_offset: int) -> dict:
        """OpenAI's logprobs object: chat's `content` list, or completions' parallel lists."""
        texts = [self.token_text(t) for t in token_ids]
        if self.chat:
            return {"content": [
                {"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                 "top_logprobs": [{"token": self.token_text(t), "logprob": v,
                                   "bytes": list(self.token_text(t).encode())}
                                  for t, v in lp.top]}
                for text, lp in zip(texts, logprobs)]}
        offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=text_offset))
        return {"tokens": texts, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{**{self.token_text(t): v for t, v in lp.top},
                                  text: lp.logprob} for text, lp in zip(texts, logprobs)],
                "text_offset": offsets[: len(texts)]}

    async def collect(self, merged, requests) -> dict:
        finals: dict[int, RequestOutput] = {}
        async for index, out in merged:
            if out.finished:
                finals[index] = out
        choices = []
        for i in sorted(finals):
            content, calls = finals[i].text, None
            if self.tools is not None:
                content, calls = self.tools.parse(content)
            choices.append(self._choice(i, content, finals[i], False, tool_calls=calls))
        return self._envelope(choices, _usage(requests, finals.values()))

    async def sse(self, merged, requests, include_usage: bool) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        sent: dict[int, tuple[int, int]] = {}  # choice -> (tokens, characters) sent
        tool_streams: dict[int, ToolStream] = {}
        try:
            async for index, out in merged:
                text, calls = out.delta_text, None
                if self.tools is not None:
                    stream = tool_streams.setdefault(index, ToolStream(self.tools))
                    text = stream.feed(text)
                    if out.finished:
                        rest, calls = stream.finish()
                        text += rest
                if out.finished:
                    finals[index] = out
                if text or out.finished:
                    tokens, chars = sent.get(index, (0, 0))
                    choice = self._choice(index, text, out, True, tokens, chars, calls)
                    sent[index] = (len(out.token_ids), chars + len(text))
                    yield _sse(self._envelope([choice], chunk=True))
            if include_usage:
                yield _sse(self._envelope([], _usage(requests, finals.values()), chunk=True))
        except APIError as e:
            yield _sse(error_body(e.message, e.err_type, e.status))
        except Exception as e:  # the engine failed or shut down: tell the client, then end
            yield _sse(error_body(str(e), "server_error", 500))
        finally:  # a client that left mid-stream lands here too: abort its requests now
            await merged.aclose()
        yield "data: [DONE]\n\n"


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _usage(requests, finals) -> dict:
    prompt = sum(r.num_prompt_tokens for r in requests)
    completion = sum(len(o.token_ids) for o in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
