"""The HTTP API through the official openai client, against a real server process."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from sloserve import SamplingParams
from tests.server.conftest import API_KEY, ServerProcess

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key


def test_chat_greedy_equals_offline_generate_and_usage_matches_tokenizer(client, llm):
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24,
                                           temperature=0)
    offline = llm.generate(HI, SamplingParams(max_tokens=24, temperature=0))[0]
    choice = reply.choices[0]
    assert choice.message.content == offline.text and choice.finish_reason == offline.finish_reason
    prompt_ids = llm.engine.apply_chat_template(HI)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(offline.token_ids)
    timings = choice.model_extra["timings"]
    assert 0 <= timings["queueing_ms"] <= timings["ttft_ms"] <= timings["e2e_ms"]


def test_completion_with_stop_string_and_length(client, llm):
    prompt = "The three primary colors are"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    stop = full.choices[0].text.split()[1]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert full.choices[0].text.startswith(cut.choices[0].text) and stop not in cut.choices[0].text


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16,
                                           temperature=0)
    assert text == whole.choices[0].message.content


def test_logprobs_streamed_and_whole_in_openai_shapes(client):
    """Completions: parallel lists; chat: a content list; streamed chunks add up to the
    whole reply's values (greedy: the chosen token is the likeliest)."""
    whole = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      max_tokens=6, temperature=0, logprobs=2)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text and len(lp.token_logprobs) == 6
    assert all(len(top) == 2 and max(top.values()) == value
               for top, value in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
        logprobs=2, stream=True) if c.choices and c.choices[0].logprobs]
    assert [v for c in streamed for v in c.token_logprobs] == lp.token_logprobs
    assert [o for c in streamed for o in c.text_offset] == lp.text_offset
    chat = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob
               and bytes(t.bytes).decode() == t.token for t in content)


def test_n_two_choices_and_slo_extension(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=8, temperature=1.0, seed=3, n=2,
        extra_body={"slo": {"ttft_ms": 60000, "tpot_ms": 60000, "realtime": True},
                    "priority": 1})
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens < 40
    assert all(c.model_extra["timings"]["slo_attained"] is True for c in reply.choices)


@pytest.mark.parametrize("body, status, words", [
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": "gpt-4", "messages": HI}, 404, "gpt-4"),
    ({"model": MODEL, "messages": HI, "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "messages": HI, "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": HI, "slo": {"tpot_ms": -5}}, 400, "tpot_ms"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 2000}]}, 400, "context"),
    ({"model": MODEL, "messages": HI, "max_tokens": 10**9}, 400, "max_tokens can be at most"),
    ({"model": MODEL, "messages": HI, "top_logprobs": 2}, 400, "needs logprobs"),
    ({"model": MODEL, "messages": HI, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 10**7}]}, 400,
     "10000000 characters cannot fit"),
    # a field that is not part of the API is refused by name, never silently dropped
    ({"model": MODEL, "messages": HI, "temprature": 0}, 400, "temprature"),
    ({"model": MODEL, "messages": HI, "logit_bias": {"49152": 5}}, 400, "logit_bias"),
    ({"model": MODEL, "messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     400, "bogus"),
    ({"model": MODEL, "messages": HI, "structured_outputs": {"regex": "a("}}, 400, "regex"),
    ({"model": MODEL, "messages": HI, "tool_choice": "required"}, 400, "needs tools"),
])
def test_bad_input_gets_openai_error(server, body, status, words):
    started = time.monotonic()
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert time.monotonic() - started < 2  # a 10 MB prompt is refused before tokenizing
    assert r.status_code == status
    error = r.json()["error"]
    assert words in error["message"] and error["type"]


def test_malformed_json_and_api_key(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": ',
                   headers={"Authorization": f"Bearer {API_KEY}",
                            "Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_openapi_spec_documents_the_extensions(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "max_completion_tokens", "slo", "priority", "stream"} <= set(chat)


def test_dropped_streams_are_aborted_and_their_blocks_freed(server):
    from openai import AsyncOpenAI

    async def one(client, index: int) -> str | None:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell story number {index}."}],
            max_tokens=48, temperature=0, stream=True, extra_body={"ignore_eos": True})
        pieces = []
        async for chunk in stream:
            pieces.append(chunk)
            if index % 2 and len(pieces) == 3:
                await stream.close()  # the client walks away mid-stream
                return None
        assert pieces[-1].choices[0].finish_reason == "length"
        return "".join(c.choices[0].delta.content or "" for c in pieces)

    async def main():
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(main())
    assert sum(r is not None for r in results) == 8 and all(results[0::2])
    assert server.settled_metric("num_requests_running", 0) == 0
    assert server.settled_metric("kv_cache_usage_perc", 0.0) == 0.0


def test_flood_past_max_waiting_gets_429():
    srv = ServerProcess("--max-waiting", "2", "--max-num-seqs", "1")
    try:
        async def main():
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"prompt": "Count to fifty:", "max_tokens": 16, "ignore_eos": True}
                return await asyncio.gather(*(http.post(f"{srv.url}/v1/completions", json=body)
                                              for _ in range(12)))

        responses = asyncio.run(main())
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.headers["Retry-After"] and busy.json()["error"]["type"] == "rate_limit_error"
        assert srv.settled_metric("kv_cache_usage_perc", 0.0) == 0.0
    finally:
        srv.stop()


def test_sigterm_to_the_process_group_finishes_in_flight_requests_then_exits():
    """As systemd or Ctrl-C signal it: the server and its engine process at once."""
    srv = ServerProcess()
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
    streams = [client.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=40,
                                         temperature=0, stream=True,
                                         extra_body={"ignore_eos": True}) for i in range(6)]
    firsts = [next(iter(s)) for s in streams]
    os.killpg(srv.proc.pid, signal.SIGTERM)
    rests = [list(s) for s in streams]
    assert all(f.choices[0].text is not None for f in firsts)
    assert all(rest[-1].choices[0].finish_reason == "length" for rest in rests)
    assert srv.proc.wait(30) == 0
    assert "Application shutdown complete" in srv.output()


def test_admission_control_503_and_request_timeout_408():
    srv = ServerProcess("--policy", "slice", "--max-tokens-default", "3",
                        "--request-timeout", "2")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        impossible = {"slo": {"ttft_ms": 0.01, "realtime": True}}  # no prefill is that fast
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as err:
                reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4,
                                                  stream=stream, extra_body=impossible)
                list(reply) if stream else None
            assert err.value.status_code == 503 and err.value.response.headers["Retry-After"]
            assert "TTFT objective" in err.value.message
        best_effort = {"slo": {**impossible["slo"], "on_miss": "best_effort"}}
        reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4,
                                          extra_body=best_effort)
        assert reply.choices[0].text and reply.choices[0].finish_reason == "length"
        uncapped = client.completions.create(model=MODEL, prompt="Hello",
                                             extra_body={"ignore_eos": True})
        assert uncapped.usage.completion_tokens == 3  # --max-tokens-default
        with pytest.raises(openai.APIStatusError) as err:  # ~50 ms a token: past 2 s
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=1000,
                                      extra_body={"ignore_eos": True})
        assert err.value.status_code == 408 and "timed out" in err.value.message
        assert srv.metric("request_rejected_total") == 2
        assert srv.settled_metric("kv_cache_usage_perc", 0.0) == 0.0
    finally:
        srv.stop()


def test_generation_defaults_fill_only_what_a_request_omits(tmp_path):
    from sloserve.model.generation_config import generation_defaults
    from sloserve.server.protocol import CompletionRequest

    assert generation_defaults("auto", None) == {"temperature": 0.2, "top_p": 0.9}  # shipped
    assert generation_defaults("none", None) == {}
    own = tmp_path / "generation_config.json"
    own.write_text('{"temperature": 0, "top_k": 5, "do_sample": false, "top_p": null}')
    defaults = generation_defaults(str(own), None)
    assert defaults == {"temperature": 0, "top_k": 5}
    params = CompletionRequest(prompt="x", top_p=0.5).sampling_params(8, 0, defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0, 0.5, 5)
    openai_ones = CompletionRequest(prompt="x").sampling_params(8, 0)
    assert (openai_ones.temperature, openai_ones.top_p, openai_ones.top_k) == (1.0, 1.0, -1)
    penalised = CompletionRequest(prompt="x", frequency_penalty=1.5, presence_penalty=-1,
                                  repetition_penalty=1.2).sampling_params(8, 0, defaults)
    assert (penalised.frequency_penalty, penalised.presence_penalty,
            penalised.repetition_penalty) == (1.5, -1, 1.2)
    own.write_text("[1]")
    with pytest.raises(ValueError, match="JSON object"):
        generation_defaults(str(own), None)
