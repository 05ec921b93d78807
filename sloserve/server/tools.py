"""Tool calling for /v1/chat/completions: the tools go into the prompt, the reply's calls
come out as OpenAI `tool_calls`.

The prompt and reply format are SmolLM2's (a system block listing the tools as JSON, calls
written as `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`), used for any model
whose chat template does not render tools itself. `tool_choice` "required" and a named
function are enforced by the grammar engine, so they hold for any model: "required" makes
the reply a JSON list of calls, a named function makes it that function's arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from sloserve.request import StructuredOutput

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALLS = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)",
                    re.DOTALL)

SYSTEM_PROMPT = """You can call functions. These are the functions you may call, as JSON:
<tools>{tools}</tools>
To call functions, reply with only the calls, in this format:
<tool_call>[{{"name": "function_name", "arguments": {{"argument": "value"}}}}]</tool_call>
If no function fits the request, answer in plain text."""


@dataclass(frozen=True)
class ToolMode:
    """What a request's `tools` and `tool_choice` ask of the reply."""

    functions: tuple[dict, ...]  # each tool's "function" object
    choice: str  # "auto", "required" or "named"
    name: str | None = None  # the named function
    parallel: bool = True

    def constraint(self) -> StructuredOutput | None:
        """The grammar that enforces the choice; None for "auto"."""
        if self.choice == "named":
            function = next(f for f in self.functions if f["name"] == self.name)
            return StructuredOutput("json", json.dumps(_parameters(function)))
        if self.choice == "required":
            calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
                {"type": "object", "additionalProperties": False,
                 "required": ["name", "arguments"],
                 "properties": {"name": {"const": f["name"]}, "arguments": _parameters(f)}}
                for f in self.functions]}}
            if not self.parallel:
                calls["maxItems"] = 1
            return StructuredOutput("json", json.dumps(calls))
        return None

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """The reply's plain content (None when it is all calls) and its tool calls."""
        if self.choice == "named":
            return None, [_call(self.name, text)] if _is_json(text) else []
        if self.choice == "required":
            calls = _json_or_none(text)
            if not isinstance(calls, list):
                return text, []
            return None, [_call(c["name"], json.dumps(c["arguments"])) for c in calls]
        calls = []
        for match in _CALLS.finditer(text):
            found = _json_or_none(match.group(1).strip())
            for c in found if isinstance(found, list) else [found]:
                if isinstance(c, dict) and isinstance(c.get("name"), str):
                    calls.append(_call(c["name"], json.dumps(c.get("arguments", {}))))
        if not calls:
            return text, []
        content = _CALLS.sub("", text).strip()
        return content or None, calls if self.parallel else calls[:1]


def tool_mode(tools: list[dict] | None, tool_choice: str | dict | None,
              parallel: bool) -> ToolMode | None:
    """None when the request uses no tools (none given, or tool_choice "none");
    ValueError naming what is wrong."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise ValueError("tool_choice needs tools")
    if not tools or tool_choice == "none":
        return None
    functions = tuple(t["function"] for t in tools)
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        if name not in {f["name"] for f in functions}:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return ToolMode(functions, "named", name, parallel)
    return ToolMode(functions, tool_choice or "auto", None, parallel)


def render_messages(messages: list[dict], mode: ToolMode | None) -> list[dict[str, str]]:
    """Plain role/content messages for the chat template: the tools listed in the system
    message, earlier assistant calls written back in the reply format."""
    rendered = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"],
                      "arguments": _json_or_none(c["function"]["arguments"]) or {}}
                     for c in m["tool_calls"]]
            content += f"{CALL_OPEN}{json.dumps(calls)}{CALL_CLOSE}"
        rendered.append({"role": m["role"], "content": content})
    if mode is None:
        return rendered
    tools = SYSTEM_PROMPT.format(tools=json.dumps(
        [{"type": "function", "function": f} for f in mode.functions]))
    if rendered and rendered[0]["role"] == "system":
        rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{tools}"}
    else:
        rendered.insert(0, {"role": "system", "content": tools})
    return rendered


@dataclass
class ToolStream:
    """One streamed choice: passes plain text on as it comes and holds back what may be
    (or start) a call, which finish() turns into tool calls."""

    mode: ToolMode
    text: str = ""
    sent: int = 0  # characters of `text` already streamed as content
    held: bool = field(init=False, default=False)

    def feed(self, delta: str) -> str:
        """The content that can be streamed now."""
        self.text += delta
        if self.mode.choice != "auto" or self.held:
            return ""
        start = self.text.find(CALL_OPEN, self.sent)
        if start >= 0:
            self.held = True
            return self._take(start)
        # keep back an unfinished "<tool_c..." at the end
        keep = next((k for k in range(min(len(CALL_OPEN) - 1, len(self.text)), 0, -1)
                     if CALL_OPEN.startswith(self.text[-k:])), 0)
        return self._take(len(self.text) - keep)

    def finish(self) -> tuple[str, list[dict]]:
        """The content not streamed yet and the reply's tool calls."""
        _, calls = self.mode.parse(self.text)
        if not calls:
            return self._take(len(self.text)), []
        # auto: what came before the first call is streamed already; text after calls stays
        rest = _CALLS.sub("", self.text[self.sent:]).strip() if self.mode.choice == "auto" \
            else ""
        return rest, calls

    def _take(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


def _parameters(function: dict) -> dict:
    """The function's argument schema, closed to undeclared arguments unless it says
    otherwise (as OpenAI's strict mode): an open schema let the 135M model invent arguments
    until max_tokens."""
    parameters = dict(function.get("parameters") or {"type": "object"})
    if "properties" in parameters:
        parameters.setdefault("additionalProperties", False)
    return parameters


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def _is_json(text: str) -> bool:
    return _json_or_none(text) is not None
