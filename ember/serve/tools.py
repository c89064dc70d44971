"""Structured-output and tool-calling plumbing for the OpenAI endpoints.

- `response_format` (json_object, json_schema), vLLM's `structured_outputs` extra body
  (choice, regex, json, grammar) and the older `guided_*` fields -> one StructuredOutput.
- Tools: `tool_choice` "required" constrains the output to {"name": ..., "arguments": {...}}
  for one of the tools, a named function constrains it to that function's arguments (so
  they always parse); "auto" generates freely and a Hermes-style parser lifts
  `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks out of the text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ember.engine.request import StructuredOutput
from ember.serve.protocol import OpenAIError

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CLOSE), re.DOTALL)


def bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param)


def structured_from_body(body) -> StructuredOutput | None:
    """The request's output constraint, if any (tools are handled by `ToolPlan`); a bad one is a 400."""
    try:
        return _structured_from_body(body)
    except ValueError as e:  # StructuredOutput's checks name the field
        raise OpenAIError(400, str(e), param=str(e).split(":", 1)[0]) from None


def _structured_from_body(body) -> StructuredOutput | None:
    specs: list[StructuredOutput] = []
    fmt = getattr(body, "response_format", None)
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            specs.append(StructuredOutput(json_object=True))
        elif kind == "json_schema":
            inner = fmt.get("json_schema") or {}
            schema = inner.get("schema") if isinstance(inner, dict) else None
            if not isinstance(schema, dict):
                raise bad("response_format.json_schema", "needs a 'schema' object")
            specs.append(StructuredOutput(json_schema=schema))
        elif kind != "text":
            raise bad("response_format", f"type {kind!r} is not one of text, json_object, json_schema")
    extra = dict(getattr(body, "structured_outputs", None) or {})
    for old, new in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                     ("guided_grammar", "grammar")):
        if getattr(body, old, None) is not None:
            extra[new] = getattr(body, old)
    for key, value in extra.items():
        if key == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise bad("guided_json", f"not valid JSON ({e})") from None
            if not isinstance(value, dict):
                raise bad("guided_json", f"{value!r:.80} is not a JSON schema object")
            specs.append(StructuredOutput(json_schema=value))
        elif key in ("regex", "grammar"):
            specs.append(StructuredOutput(**{key: value}))
        elif key == "choice":
            specs.append(StructuredOutput(choice=value))
        elif key == "json_object" and value:
            specs.append(StructuredOutput(json_object=True))
        elif key != "json_object":
            raise bad("structured_outputs", f"unknown key {key!r} (choice, regex, json, grammar, json_object)")
    if len(specs) > 1:
        raise bad("response_format", "give one output constraint, not several")
    return specs[0] if specs else None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    """What `tools` + `tool_choice` ask of one chat request."""

    mode: str  # none | auto | required | named
    tools: list[dict[str, Any]] = field(default_factory=list)
    name: str | None = None

    @classmethod
    def from_body(cls, tools: list[dict] | None, tool_choice: Any) -> "ToolPlan":
        tools = tools or []
        functions = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
                raise bad(f"tools[{i}]", "must be {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}")
            functions.append(fn)
        if tool_choice is None:
            tool_choice = "auto" if tools else "none"
        if isinstance(tool_choice, dict):
            name = (tool_choice.get("function") or {}).get("name")
            if name not in {f["name"] for f in functions}:
                raise bad("tool_choice", f"function {name!r} is not among the tools")
            return cls("named", functions, name)
        if tool_choice not in ("none", "auto", "required"):
            raise bad("tool_choice", f"{tool_choice!r} is not none, auto, required or a named function")
        if tool_choice == "required" and not functions:
            raise bad("tool_choice", "'required' needs at least one tool")
        return cls(tool_choice if functions else "none", functions)

    def parameters(self, name: str) -> dict:
        fn = next(f for f in self.tools if f["name"] == name)
        return fn.get("parameters") or {"type": "object"}

    def structured(self) -> StructuredOutput | None:
        if self.mode == "named":
            return StructuredOutput(json_schema=self.parameters(self.name))
        if self.mode == "required":
            options = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                         "arguments": f.get("parameters") or {"type": "object"}},
                        "required": ["name", "arguments"], "additionalProperties": False} for f in self.tools]
            return StructuredOutput(json_schema=options[0] if len(options) == 1 else {"anyOf": options})
        return None

    def template_tools(self) -> list[dict] | None:
        return [{"type": "function", "function": f} for f in self.tools] if self.mode != "none" else None

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """Final text -> (content, tool calls in OpenAI's shape)."""
        if self.mode == "named":
            return None, [_call(self.name, text)]
        if self.mode == "required":
            data = json.loads(text)
            return None, [_call(data["name"], json.dumps(data["arguments"], ensure_ascii=False))]
        if self.mode == "auto":
            calls = []
            for block in _TOOL_BLOCK.findall(text):
                try:
                    data = json.loads(block)
                    arguments = data.get("arguments", data.get("parameters", {}))
                    calls.append(_call(data["name"], arguments if isinstance(arguments, str)
                                       else json.dumps(arguments, ensure_ascii=False)))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    continue  # not a well-formed call: leave it in the content
            if calls:
                content = _TOOL_BLOCK.sub("", text).strip()
                return content or None, calls
        return text, []

    def streamable_content(self, text: str, finished: bool) -> str:
        """The prefix of the text that is surely content (auto mode holds back anything that
        may open a tool call until the end)."""
        if self.mode in ("named", "required"):
            return ""
        if self.mode != "auto":
            return text
        cut = text.find(TOOL_OPEN)
        if cut != -1:
            return text[:cut]
        if finished:
            return text
        for keep in range(min(len(TOOL_OPEN) - 1, len(text)), 0, -1):
            if TOOL_OPEN.startswith(text[-keep:]):
                return text[:-keep]
        return text


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
