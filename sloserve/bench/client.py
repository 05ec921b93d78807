"""Load generator for any OpenAI-compatible endpoint (sloserve, vLLM, SGLang, ...).

Requests leave at their arrival offsets (optionally capped by --max-concurrency), stream their
replies, and every content chunk's arrival time is recorded.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from sloserve.workload.metrics import RequestRecord
from sloserve.workload.spec import RequestSpec


class EndpointError(Exception):
    """The server cannot be reached or does not serve a model: a one-line CLI error."""


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    max_concurrency: int | None = None
    send_slo: bool = True  # sloserve's "slo" extension in the body (others ignore it)
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout_s: float = 600.0
    extra_body: dict | None = None  # merged into every request, e.g. {"cache_prompt": False}
    class_priority: dict[str, int] | None = None  # "priority" per SLO class (vLLM: lower first)
    cutoff_s: float | None = None  # requests unfinished this long after the start are abandoned

    @property
    def v1(self) -> str:
        url = self.base_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Until the server `proc` started answers 200 on /health; RuntimeError if it exits or
    takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server did not come up within {timeout:g} s")


async def resolve_model(config: ClientConfig) -> str:
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{config.v1}/models", headers=config.headers)
    except httpx.HTTPError as e:
        raise EndpointError(f"cannot reach {config.v1}: {e.__class__.__name__}") from None
    if r.status_code != 200:
        raise EndpointError(f"{config.v1}/models answered HTTP {r.status_code}")
    models = [m["id"] for m in r.json().get("data", [])]
    if config.model:
        return config.model
    if not models:
        raise EndpointError(f"{config.v1} serves no model")
    return models[0]


async def run_requests(config: ClientConfig, specs: list[RequestSpec],
                       on_done: Callable[[], None] | None = None
                       ) -> tuple[list[RequestRecord], float]:
    """Send every request at its offset; returns records in spec order and the duration."""
    model = await resolve_model(config)
    limit = asyncio.Semaphore(config.max_concurrency or len(specs) or 1)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=config.timeout_s, limits=limits) as http:
        start = time.monotonic()

        async def one(spec: RequestSpec) -> RequestRecord:
            await asyncio.sleep(max(0.0, spec.arrival - (time.monotonic() - start)))
            async with limit:
                sending = _send(http, config, model, spec, start)
                if config.cutoff_s is None:
                    record = await sending
                else:  # past capacity a queue drains for minutes: end the run on time
                    left = config.cutoff_s - (time.monotonic() - start)
                    try:
                        record = await asyncio.wait_for(sending, max(0.0, left))
                    except asyncio.TimeoutError:
                        record = RequestRecord.start(spec.index, spec.slo_class, spec.slo,
                                                     spec.arrival)
                        record.prompt_tokens = spec.prompt_len
                        record.error = f"unfinished at the run's cut-off ({config.cutoff_s:g} s)"
            if on_done:
                on_done()
            return record

        records = await asyncio.gather(*(one(s) for s in specs))
        return list(records), time.monotonic() - start


def _body(config: ClientConfig, model: str, spec: RequestSpec) -> tuple[str, dict]:
    body = {"model": model, "max_tokens": spec.max_tokens, "temperature": config.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        body["ignore_eos"] = True
    body.update(config.extra_body or {})
    if config.class_priority is not None:
        body["priority"] = config.class_priority.get(spec.slo_class, 0)
    if config.send_slo:
        slo = {k: v for k, v in (("ttft_ms", spec.slo.ttft_ms), ("tpot_ms", spec.slo.tpot_ms),
                                 ("deadline_ms", spec.slo.deadline_ms)) if v is not None}
        body["slo"] = {**slo, "realtime": spec.slo.realtime}
    if "tokens" in spec.extra:  # a trace's or a length-only workload's token ids
        return "completions", {**body, "prompt": list(spec.extra["tokens"])}
    if spec.chat:
        return "chat/completions", {**body, "messages": [{"role": "user", "content": spec.text}]}
    return "completions", {**body, "prompt": spec.text}


async def _send(http: httpx.AsyncClient, config: ClientConfig, model: str, spec: RequestSpec,
                start: float) -> RequestRecord:
    sent = time.monotonic() - start
    record = RequestRecord.start(spec.index, spec.slo_class, spec.slo, sent)
    record.prompt_tokens = spec.prompt_len
    path, body = _body(config, model, spec)
    token_times: list[float] = []
    try:
        async with http.stream("POST", f"{config.v1}/{path}", json=body,
                               headers=config.headers) as r:
            if r.status_code != 200:
                record.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return record
            async for line in r.aiter_lines():
                _on_event(line, record, token_times, time.monotonic() - start)
    except httpx.HTTPError as e:
        record.error = f"{e.__class__.__name__}: {e}"
    record.finish(token_times, token_times[-1] if token_times else time.monotonic() - start)
    if not token_times and not record.error:
        record.error = "no tokens"
    return record


def _on_event(line: str, record: RequestRecord, token_times: list[float], now: float) -> None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    event = json.loads(line[6:])
    if "error" in event:
        record.error = str(event["error"].get("message", event["error"]))[:200]
        return
    if event.get("usage"):
        record.prompt_tokens = event["usage"]["prompt_tokens"]
        record.output_tokens = event["usage"]["completion_tokens"]
    for choice in event.get("choices", []):
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get(
            "content")
        if text:
            token_times.append(now)
        timings = choice.get("timings")
        if timings and timings.get("queueing_ms") is not None:
            record.queue_ms = timings["queueing_ms"]
