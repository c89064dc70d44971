"""LoRA over HTTP: adapters listed in /v1/models, selected by "model", loaded and unloaded at run time;
each answer equals the offline engine's for the same adapter."""

from __future__ import annotations

import httpx
import pytest

from ember import LLM, SamplingParams
from ember.engine.lora import LoRARequest
from tests.engine.test_lora import make_adapter
from tests.serve.conftest import running_server

pytest.importorskip("peft")


def test_adapters_by_name_and_at_run_time(model_factory, tmp_path):
    import openai

    base = model_factory("llama", std=0.1)
    a = make_adapter(base, tmp_path / "a", seed=21, r=4)
    b = make_adapter(base, tmp_path / "b", seed=22, r=8, targets=["q_proj", "v_proj"])
    prompt = [5, 6, 7, 8, 9, 10]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    offline = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2)
    want = {name: offline.generate([prompt], params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
            for name, lora in [("tiny", None), ("a", LoRARequest("a", 1, str(a))), ("b", LoRARequest("b", 2, str(b)))]}
    assert len(set(want.values())) == 3
    with running_server(base, enable_lora=True, max_loras=2, lora_modules={"a": str(a)},
                        allow_runtime_lora_updating=True) as server:
        client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == {"tiny", "a"} and listed["a"].parent == "tiny"

        def complete(model: str) -> str:
            return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        assert complete("tiny") == want["tiny"] and complete("a") == want["a"]
        with pytest.raises(openai.NotFoundError, match="'b' does not exist"):
            complete("b")
        http = httpx.Client(base_url=server.base_url, timeout=60)
        bad = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path / "none")})
        assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(b)}).status_code == 200
        assert complete("b") == want["b"] and complete("a") == want["a"]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 404
        with pytest.raises(openai.NotFoundError):
            complete("b")
        assert {m.id for m in client.models.list().data} == {"tiny", "a"}


def test_runtime_updates_are_off_unless_allowed(model_factory, tmp_path):
    base = model_factory("llama", std=0.1)
    with running_server(base, enable_lora=True) as server:
        r = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
        assert r.status_code == 404
