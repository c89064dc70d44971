"""Structured output and tool calling through the server, with the official openai client."""

import json

import httpx
import jsonschema
import openai
import pytest

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                      "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "add", "parameters": {
        # bounded: greedy decoding of a random model can write an unbounded integer's digits forever
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                         "b": {"type": "integer", "minimum": -999, "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
USER = [{"role": "user", "content": "What's the weather?"}]


def test_response_format_json_schema_and_json_object(client):
    out = client.chat.completions.create(
        model="tiny", messages=USER, temperature=1.0, seed=4, max_tokens=120, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "plan", "schema": SCHEMA}},
    )
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    obj = client.completions.create(model="tiny", prompt="{", max_tokens=150, temperature=1.0, seed=1,
                                    extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(obj.choices[0].text), dict)


def test_vllm_structured_outputs_extra_body(client):
    choice = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=1.0,
                                            extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(model="tiny", prompt="id:", max_tokens=20, temperature=1.0,
                                      extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"})
    assert len(regex.choices[0].text) == 6 and regex.choices[0].text[3] == "-"


def test_bad_schema_and_regex_are_400(server, client):
    r = httpx.post(f"{server.v1}/chat/completions", json={
        "model": "tiny", "messages": USER,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}})
    assert r.status_code == 400 and "json_schema" in r.json()["error"]["message"]
    r = httpx.post(f"{server.v1}/completions", json={"model": "tiny", "prompt": "x", "guided_regex": "([a-"})
    assert r.status_code == 400 and "regex" in r.json()["error"]["message"]
    r = httpx.post(f"{server.v1}/chat/completions", json={"model": "tiny", "messages": USER,
                                                          "response_format": {"type": "yaml"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert client.completions.create(model="tiny", prompt="still fine", max_tokens=3).choices


def test_tool_choice_required_and_named(client):
    required = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                              max_tokens=150, temperature=1.0, seed=2)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)

    named = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=150,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           temperature=1.0, seed=5)
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_reassemble(client, tool_choice):
    kwargs = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice=tool_choice, max_tokens=150,
                  temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                entry["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                entry["arguments"] += tc.function.arguments
        if chunk.choices[0].finish_reason:
            reasons.append(chunk.choices[0].finish_reason)
    assert reasons == ["tool_calls"]
    assert calls[0]["name"] == full.function.name and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == json.loads(full.function.arguments)


def test_auto_tool_parser_and_tool_history(client):
    from ember.serve.tools import ToolPlan

    plan = ToolPlan.from_body(TOOLS, "auto")
    content, calls = plan.parse('Let me check. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    assert content == "Let me check." and calls[0]["function"]["name"] == "add"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert plan.streamable_content("Hello <tool", finished=False) == "Hello "
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    out = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=8)
    assert out.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=8,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
