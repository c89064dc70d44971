"""Structured output: sampled outputs at temperature 1 always parse and validate."""

import json
import re

import jsonschema
import pytest

from ember import LLM, SamplingParams
from ember.engine.request import StructuredOutput

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                                                "required": ["x", "y"], "additionalProperties": False},
                                      "ok": {"type": "boolean"}},
     "required": ["point", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
     "required": ["code"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), dtype="float32")


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "enum-array", "nested", "pattern"])
def test_json_schema_outputs_validate(llm, schema):
    params = SamplingParams(temperature=1.0, max_tokens=200, seed=3, n=6, structured=StructuredOutput(json_schema=schema))
    out = llm.generate(["Give me JSON:"], params, use_tqdm=False)[0]
    for completion in out.outputs:
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), schema)


def test_json_object_regex_and_choice(llm):
    outs = llm.generate(
        ["a", "b", "c"],
        [SamplingParams(temperature=1.0, max_tokens=200, seed=1, structured={"json_object": True}),
         SamplingParams(temperature=1.0, max_tokens=30, seed=2, structured={"regex": r"[a-z]{3}-[0-9]{2,4}"}),
         SamplingParams(temperature=1.0, max_tokens=30, seed=3, n=8, structured={"choice": ["red", "green", "blue"]})],
        use_tqdm=False,
    )
    assert isinstance(json.loads(outs[0].outputs[0].text), dict)
    assert re.fullmatch(r"[a-z]{3}-[0-9]{2,4}", outs[1].outputs[0].text)
    assert {o.text for o in outs[2].outputs} <= {"red", "green", "blue"}


def test_invalid_specs_are_value_errors(llm):
    with pytest.raises(ValueError, match="regex"):
        llm.generate(["x"], SamplingParams(structured={"regex": "([a-z"}), use_tqdm=False)
    with pytest.raises(ValueError, match="json_schema"):
        llm.generate(["x"], SamplingParams(structured={"json_schema": {"type": "no-such-type"}}), use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one"):
        SamplingParams(structured={"regex": "a", "choice": ["b"]})
    assert llm.generate(["x"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("order", [["reasoning", "answer"], ["zeta", "alpha"]])
def test_json_output_keeps_the_schema_property_order(llm, order):
    """reasoning-before-answer schemas only work if the model writes the properties in the schema's order."""
    kinds = {"reasoning": {"type": "string", "maxLength": 8}, "answer": {"type": "integer", "minimum": 0, "maximum": 99},
             "zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}}
    schema = {"type": "object", "properties": {k: kinds[k] for k in order}, "required": order,
              "additionalProperties": False}
    params = SamplingParams(temperature=1.0, max_tokens=60, seed=5, n=4, structured={"json_schema": schema})
    for completion in llm.generate(["JSON:"], params, use_tqdm=False)[0].outputs:
        assert completion.finish_reason == "stop", completion
        assert list(json.loads(completion.text)) == order


def test_json_object_is_an_object_never_another_value(llm):
    params = SamplingParams(temperature=1.0, max_tokens=120, seed=11, n=8, structured={"json_object": True})
    for completion in llm.generate(["["], params, use_tqdm=False)[0].outputs:
        assert completion.text.startswith("{")
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
