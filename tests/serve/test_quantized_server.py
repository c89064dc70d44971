"""`ember serve --quantization int8 --kv-cache-dtype int8`: the server runs a quantized engine."""

import openai

from ember.cli import build_parser, engine_kwargs
from ember.models.quant import QuantizedLinear
from tests.serve.conftest import running_server


def test_cli_flags_reach_the_engine_config():
    args = build_parser().parse_args(["serve", "--quantization", "int4", "--quantization-group-size", "32",
                                      "--kv-cache-dtype", "int8", "--no-quantize-lm-head"])
    kwargs = engine_kwargs(args)
    assert kwargs["quantization"] == "int4" and kwargs["quantization_group_size"] == 32
    assert kwargs["kv_cache_dtype"] == "int8" and kwargs["quantize_lm_head"] is False


def test_quantized_server_completes(llama_dir):
    with running_server(llama_dir, dtype="bfloat16", quantization="int8", kv_cache_dtype="int8") as server:
        model = server.llm.engine.model
        assert isinstance(model.lm_head, QuantizedLinear)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
        out = client.completions.create(model="tiny", prompt="hello there", max_tokens=6,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 6
