"""The OpenAI-compatible server, driven by the official openai client and httpx over TCP."""

import asyncio
import json

import httpx
import openai
import pytest

from tests.serve.conftest import running_server
from tests.waiting import wait_until

GREEDY = dict(temperature=0, max_tokens=24)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/version").json()["version"]


def test_completion_prompt_forms_and_usage(client, server):
    tok = server.llm.tokenizer
    one = client.completions.create(model="tiny", prompt="Once upon a time", **GREEDY)
    assert one.object == "text_completion" and len(one.choices) == 1
    prompt_len = len(tok.encode("Once upon a time"))
    assert one.usage.prompt_tokens == prompt_len
    assert one.usage.completion_tokens == 24 or one.choices[0].finish_reason == "stop"
    assert one.usage.total_tokens == one.usage.prompt_tokens + one.usage.completion_tokens

    ids = tok.encode("Once upon a time")
    by_ids = client.completions.create(model="tiny", prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == one.choices[0].text

    many = client.completions.create(model="tiny", prompt=["Once upon a time", "The sky"], n=2, **GREEDY)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    first = [c for c in many.choices if c.index in (0, 1)]
    assert all(c.text == one.choices[0].text for c in first)
    assert many.usage.prompt_tokens == prompt_len + len(tok.encode("The sky"))


def test_completion_echo_logprobs_stop_seed(client):
    out = client.completions.create(model="tiny", prompt="Hello world", echo=True, logprobs=3, **GREEDY)
    choice = out.choices[0]
    assert choice.text.startswith("Hello world")
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:])

    free = client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=30, extra_body={"ignore_eos": True})
    text = free.choices[0].text
    if len(text) > 6:
        stop = text[3:6]
        stopped = client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=30, stop=[stop],
                                            extra_body={"ignore_eos": True})
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == text[: text.index(stop)]

    a = client.completions.create(model="tiny", prompt="Hello", temperature=1.0, max_tokens=16, seed=42)
    b = client.completions.create(model="tiny", prompt="Hello", temperature=1.0, max_tokens=16, seed=42)
    assert a.choices[0].text == b.choices[0].text


def test_vllm_extra_sampling_fields_accepted(client):
    out = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=8, temperature=0.8,
        extra_body=dict(top_k=5, min_p=0.05, repetition_penalty=1.2, min_tokens=8, ignore_eos=True,
                        stop_token_ids=[3]),
    )
    assert len(out.choices) == 1 and out.usage.completion_tokens == 8


def test_suffix_is_rejected(client):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="tiny", prompt="a", suffix="b", max_tokens=2)


def test_streamed_text_equals_non_streamed(client):
    for stream_kind in ("completion", "chat"):
        if stream_kind == "completion":
            full = client.completions.create(model="tiny", prompt="The garden", **GREEDY)
            chunks = list(client.completions.create(model="tiny", prompt="The garden", stream=True, **GREEDY))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert text == full.choices[0].text
        else:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me more"}]
            full = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
            chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                         stream_options={"include_usage": True}, **GREEDY))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert text == full.choices[0].message.content
            assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
            assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
        assert len(reasons) == 1


def test_raw_sse_framing(server):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.v1}/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        json.loads(line[6:])


def test_chat_n_logprobs_and_max_completion_tokens(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3,
                                         temperature=1.0, seed=3, max_completion_tokens=12, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.message.content for c in out.choices} | {tuple(t.token for t in c.logprobs.content) for c in out.choices}) >= 3
    for c in out.choices:
        assert len(c.logprobs.content) == 12 and c.finish_reason == "length"
        for entry in c.logprobs.content:
            assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert out.usage.completion_tokens == 36
    by_max_tokens = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert by_max_tokens.usage.completion_tokens == 5


def test_tokenize_detokenize(server):
    r = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    assert httpx.post(f"{server.base_url}/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    chat = httpx.post(f"{server.base_url}/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert chat["count"] > r["count"] - 5
    bad = httpx.post(f"{server.base_url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


BAD_BODIES = [
    ({"prompt": "", "max_tokens": 4}, "prompt"),
    ({"prompt": [1] * 5000, "max_tokens": 4}, "prompt"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "max_tokens": "lots"}, "max_tokens"),
    ({"prompt": 12}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_requests_are_400_and_harmless(server, body, param):
    r = httpx.post(f"{server.v1}/completions", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    ok = httpx.post(f"{server.v1}/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200


def test_malformed_json_unknown_role_unknown_model(server):
    r = httpx.post(f"{server.v1}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.v1}/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = httpx.post(f"{server.v1}/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{server.v1}/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400
    r = httpx.post(f"{server.v1}/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    ok = httpx.post(f"{server.v1}/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_request_id_is_honoured(server):
    r = httpx.post(f"{server.v1}/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                   headers={"X-Request-Id": "my-req-1"})
    assert r.headers["x-request-id"] == "my-req-1" and r.json()["id"] == "my-req-1"


def test_disconnect_mid_stream_frees_blocks(server):
    before = server.llm.get_stats()["generation_tokens"]
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.v1}/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    wait_until(lambda: metric(server, "ember_num_requests_running") == 0, what="the aborted request to stop")
    assert metric(server, "ember_kv_cache_usage_perc") == 0.0
    stats = server.llm.get_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["generation_tokens"] - before < 1000  # aborted, not run to the end


def test_metrics_exposes_the_required_series(server, client):
    client.completions.create(model="tiny", prompt="metrics", max_tokens=4)
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("ember_num_requests_running", "ember_num_requests_waiting", "ember_kv_cache_usage_perc",
                 "ember_prompt_tokens_total", "ember_generation_tokens_total",
                 "ember_time_to_first_token_seconds_bucket", "ember_inter_token_latency_seconds_bucket",
                 "ember_e2e_request_latency_seconds_count", "ember_prefix_cache_hits_total"):
        assert name in text, name


def test_64_concurrent_streams_match_sequential(server, client):
    prompts = [f"Story number {i}: once" for i in range(64)]
    expected = [client.completions.create(model="tiny", prompt=p, temperature=0, max_tokens=12).choices[0]
                for p in prompts[:8]]

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0)

        async def one(p):
            text, reasons = "", []
            stream = await aclient.completions.create(model="tiny", prompt=p, temperature=0, max_tokens=12, stream=True)
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    if chunk.choices[0].finish_reason:
                        reasons.append(chunk.choices[0].finish_reason)
            return text, reasons

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    assert all(len(reasons) == 1 and reasons[0] in ("length", "stop") for _, reasons in results)
    assert [text for text, _ in results[:8]] == [c.text for c in expected]
    assert [r[1][0] for r in results[:8]] == [c.finish_reason for c in expected]


def test_openapi_describes_routes(server):
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health"):
        assert path in spec["paths"]


def test_api_key_and_queue_limit(model_factory):
    # A long context, so one request can keep the single running slot busy for seconds.
    long_model = model_factory("llama", max_position_embeddings=16384)
    with running_server(long_model, api_key="sekret", max_waiting=1, max_num_seqs=1) as s:
        anon = httpx.post(f"{s.v1}/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert anon.status_code == 401 and anon.json()["error"]["type"] == "authentication_error"
        wrong = openai.OpenAI(base_url=s.v1, api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        good = openai.OpenAI(base_url=s.v1, api_key="sekret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        assert httpx.get(f"{s.base_url}/health").status_code == 200  # health stays open

        headers = {"Authorization": "Bearer sekret"}
        long_body = {"model": "tiny", "prompt": "hi", "max_tokens": 16000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{s.v1}/completions", json=long_body, headers=headers) as running:
            lines = running.iter_lines()  # keep a reference: a collected iterator closes the stream
            next(line for line in lines if line.startswith("data: "))
            # one more waits behind it ...
            with httpx.stream("POST", f"{s.v1}/completions", json={**long_body, "max_tokens": 5}, headers=headers):
                wait_until(lambda: s.llm.get_stats()["num_waiting"] >= 1, what="the second request to wait")
                # ... and the next is turned away
                r = httpx.post(f"{s.v1}/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, headers=headers)
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"

        def admitted():
            r = httpx.post(f"{s.v1}/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, headers=headers)
            return r if r.status_code == 200 else None

        assert wait_until(admitted, interval=0.1, what="a request to be admitted again").status_code == 200
