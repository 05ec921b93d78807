"""Structured output and tool calls through the HTTP server, with the `openai` client: the
grammar engine must make even the 135M model's replies parse, validate and round-trip."""

from __future__ import annotations

import json

import jsonschema

from sloserve.server.tools import ToolMode, ToolStream

MODEL = "SmolLM2-135M-Instruct"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 30},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30}}}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_json_schema_replies_parse_and_validate_every_time(client):
    # twenty sampled replies at the model's default temperature, in batches of ten
    choices = [c for _ in range(2) for c in client.chat.completions.create(
        model=MODEL, n=10, max_tokens=60,
        messages=[{"role": "user", "content": "Describe a person called Tom, aged 30."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    ).choices]
    assert len(choices) == 20
    for choice in choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_regex_choice_and_logit_bias_extensions(client):
    choice = client.completions.create(
        model=MODEL, prompt="Is Paris in France? Answer:", max_tokens=8, temperature=1.0,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].text in ("yes", "no")
    phone = client.completions.create(
        model=MODEL, prompt="My phone number is", max_tokens=12, temperature=0,
        extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert len(phone.choices[0].text) == 8 and phone.choices[0].text[3] == "-"
    # a +100 bias makes a token (1060, " dep") the greedy choice wherever it stands
    biased = client.completions.create(model=MODEL, prompt="The capital of France is",
                                       max_tokens=3, temperature=0, logit_bias={"1060": 100})
    assert biased.choices[0].text == " dep dep dep"


def test_required_and_named_tool_choice_round_trip(client):
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(
            model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice=tool_choice,
            max_tokens=40, temperature=0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments),
                            WEATHER["function"]["parameters"])
    # the client sends the call and its result back; the model answers in text
    answer = client.chat.completions.create(
        model=MODEL, max_tokens=30, temperature=0, tools=[WEATHER], messages=[
            *ASK_WEATHER, choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}])
    assert answer.choices[0].message.content


def test_streamed_tool_call_assembles_as_the_openai_client_expects(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
        max_tokens=40, temperature=0, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content  # a required call streams no text
        for part in delta.tool_calls or []:
            calls.setdefault(part.index, "")
            calls[part.index] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and json.loads(calls[0])["city"]


def test_auto_tool_stream_holds_back_only_what_may_be_a_call():
    mode = ToolMode(({"name": "f", "parameters": {"type": "object"}},), "auto")
    stream = ToolStream(mode)
    # text streams at once, except an unfinished "<tool_c" that may open a call
    assert stream.feed("Let me check. <tool_c") == "Let me check. "
    assert stream.feed('all>[{"name": "f", "arguments": {"x": 1}}]') == ""
    assert stream.feed("</tool_call>") == ""
    rest, calls = stream.finish()
    assert rest == "" and [c["function"]["name"] for c in calls] == ["f"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    # a "<" that opens no call is text after all
    plain = ToolStream(mode)
    assert plain.feed("a <") == "a " and plain.feed("b") == "<b"
    assert plain.finish() == ("", [])
