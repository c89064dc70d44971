"""One request never harms another: bad input is a 400 before it reaches the shared engine step,
a failure keeps the connection's framing, a client that leaves stops its work, a dead engine says so."""

import asyncio
import json
import socket
import threading

import httpx
import pytest

from tests.serve.conftest import free_port, running_server, wait_healthy
from tests.waiting import wait_until

USER = [{"role": "user", "content": "Hello"}]

# (endpoint, body, the error's param): each the shape of a fault or conformance failure once seen
BAD = [
    ("completions", {"prompt": "hi", "n": 20000}, "n"),
    ("completions", {"prompt": "hi", "n": 2**31}, "n"),
    ("completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("completions", {"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
    ("completions", {"prompt": "hi", "stop": ["x"] * 1000}, "stop"),
    ("completions", {"prompt": "hi", "stop": ["y" * 5000]}, "stop"),
    ("completions", {"prompt": "hi", "stop_token_ids": [10**9]}, "stop_token_ids"),
    ("completions", {"prompt": "hi", "logit_bias": {"99999999": 5}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias"),
    ("completions", {"prompt": ["hi"] * 200}, "prompt"),
    ("completions", {"prompt": ["hi"] * 100, "n": 100}, "n"),
    ("completions", {"prompt": "a lone \ud800 surrogate"}, "prompt"),
    ("completions", {"prompt": "hi", "guided_choice": []}, "structured.choice"),
    ("completions", {"prompt": "hi", "guided_json": "{not json"}, "guided_json"),
    ("completions", {"prompt": "hi", "guided_regex": 5}, "guided_regex"),
    ("chat/completions", {"messages": [{"role": "user", "content": "bad \udfff text"}]}, "messages"),
    ("chat/completions", {"messages": USER, "guided_choice": []}, "structured.choice"),
    ("chat/completions", {"messages": USER, "guided_json": "not json"}, "guided_json"),
    ("chat/completions", {"messages": USER, "structured_outputs": {"choice": "yes"}}, "structured.choice"),
    ("chat/completions", {"messages": USER, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ("chat/completions", {"messages": USER, "chat_template_kwargs": {"add_generation_prompt": 1}},
     "chat_template_kwargs"),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}]}, "messages"),
    ("chat/completions", {"messages": USER, "n": 2**31}, "n"),
    ("chat/completions", {"messages": USER, "seed": 2**70}, "seed"),
]


def _raw(body: dict) -> bytes:
    # json.dumps writes lone surrogates as \ud800 escapes, as a JavaScript client would
    return json.dumps({"model": "tiny", **body}).encode()


@pytest.mark.parametrize("endpoint,body,param", BAD, ids=[f"{e}-{p}-{i}" for i, (e, _, p) in enumerate(BAD)])
def test_bad_input_is_a_400_that_keeps_the_connection(server, endpoint, body, param):
    with httpx.Client(base_url=server.v1, timeout=60) as http:
        r = http.post(f"/{endpoint}", content=_raw(body), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param, error
        assert error["type"] == "invalid_request_error"
        # the same keep-alive connection answers the next request
        ok = http.post("/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
        assert http.get("/models").status_code == 200


def test_a_burst_of_bad_requests_leaves_the_others_exact(server):
    good = [{"prompt": f"Story {i}: once upon", "max_tokens": 12, "temperature": 0} for i in range(4)]
    with httpx.Client(base_url=server.v1, timeout=60) as http:
        expected = [http.post("/completions", json={"model": "tiny", **b}).json()["choices"][0]["text"] for b in good]

    async def run():
        async with httpx.AsyncClient(base_url=server.v1, timeout=120) as http:
            async def stream(body):
                text = ""
                async with http.stream("POST", "/completions", json={"model": "tiny", **body, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text

            async def bad(endpoint, body):
                r = await http.post(f"/{endpoint}", content=_raw(body), headers={"content-type": "application/json"})
                return r.status_code

            jobs = [stream(b) for b in good] + [bad(e, b) for e, b, _ in BAD for _ in range(2)]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    assert results[:len(good)] == expected
    assert set(results[len(good):]) == {400}
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_prompt_too_long_to_fit_is_refused_before_tokenizing(server):
    engine = server.llm.engine
    limit = engine.max_model_len * engine.tokenizer.max_token_chars
    r = httpx.post(f"{server.v1}/completions", json={"model": "tiny", "prompt": "a" * (limit + 1), "max_tokens": 2})
    assert r.status_code == 400 and "characters cannot fit" in r.json()["error"]["message"]
    r = httpx.post(f"{server.v1}/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "a" * (limit + 1)}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_duplicate_request_ids_in_flight_both_complete(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.v1, timeout=60) as http:
            body = {"model": "tiny", "prompt": "same id", "max_tokens": 40, "ignore_eos": True}
            return await asyncio.gather(*(http.post("/completions", json=body, headers={"X-Request-Id": "dup-1"})
                                          for _ in range(3)))

    for r in asyncio.run(run()):
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "dup-1"
        assert r.json()["usage"]["completion_tokens"] == 40


def test_non_streaming_request_stops_when_its_client_leaves(model_factory):
    model = model_factory("llama", max_position_embeddings=4096)
    with running_server(model, max_num_seqs=16) as server:
        body = json.dumps({"model": "tiny", "prompt": "Hi", "n": 8, "max_tokens": 4000, "ignore_eos": True}).encode()
        stats = server.llm.get_stats
        host, port = server.base_url.removeprefix("http://").split(":")
        # A raw connection, so the client leaves exactly once the request is running (not after a
        # fixed client timeout, which a loaded machine can outlast before the request even starts).
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
            wait_until(lambda: stats()["num_running"] > 0, what="the request to run")
            client.setblocking(False)
            with pytest.raises(BlockingIOError):  # no response yet: the client leaves mid-request
                client.recv(1)
        wait_until(lambda: stats()["num_running"] + stats()["num_waiting"] == 0, what="the request to stop")
        assert stats()["generation_tokens"] < 8 * 4000  # aborted, not run to max_tokens
        assert stats()["num_free_blocks"] == stats()["num_blocks"]


def test_tokenizing_a_huge_input_does_not_stall_the_event_loop(llama_dir):
    with running_server(llama_dir, max_body_mb=64) as server:
        text = "lorem ipsum dolor sit amet " * 600_000  # 16 MB
        done = threading.Event()
        result = {}

        def tokenize():
            result["r"] = httpx.post(f"{server.base_url}/tokenize", json={"prompt": text}, timeout=600)
            done.set()

        worker = threading.Thread(target=tokenize)
        worker.start()
        answered = 0
        while not done.is_set():  # the loop keeps answering while the big request tokenizes
            if httpx.get(f"{server.base_url}/health", timeout=600).status_code == 200:
                answered += 1
        worker.join()
        assert result["r"].status_code == 200 and result["r"].json()["count"] > 1_000_000
        assert answered >= 3, answered


def test_engine_death_is_a_503_and_the_server_exits_non_zero(llama_dir):
    from ember.cli import listen
    from ember.engine.async_llm import AsyncLLM
    from ember.serve.app import ServerConfig, run_server

    llm = AsyncLLM.from_args(str(llama_dir), dtype="float32")
    port = free_port()
    config = ServerConfig(port=port)
    sock = listen(config.host, port)
    status = []
    thread = threading.Thread(target=lambda: status.append(run_server(llm, "tiny", config, sock=sock)))
    thread.start()
    base = f"http://127.0.0.1:{port}"
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 200

    def broken_step():
        raise RuntimeError("simulated kernel fault")

    llm.engine.step = broken_step
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    thread.join(120)  # the server stops by itself ...
    assert status == [1]  # ... with a failure status
    assert not llm.is_healthy


def test_health_is_503_once_the_engine_loop_has_stopped(llama_dir):
    with running_server(llama_dir) as server:
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        server.llm.engine.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        with httpx.stream("POST", f"{server.v1}/completions",
                          json={"prompt": "hi", "max_tokens": 4, "stream": True}, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2]
        # the loop stops right after failing the streams: /health says so from then on
        wait_until(lambda: httpx.get(f"{server.base_url}/health").status_code == 503, what="/health to say 503")
        r = httpx.post(f"{server.v1}/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503


def test_vllm_metric_names_are_exported(server):
    httpx.post(f"{server.v1}/completions", json={"model": "tiny", "prompt": "metrics", "max_tokens": 3})
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("vllm:num_requests_running{", "vllm:num_requests_waiting{", "vllm:kv_cache_usage_perc{",
                 "vllm:prefix_cache_queries_total{", "vllm:prefix_cache_hits_total{", "vllm:prompt_tokens_total{",
                 "vllm:generation_tokens_total{", 'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001"',
                 'vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01"',
                 'vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3"', "vllm:request_success_total{"):
        assert name in text, name


def test_an_unexpected_exception_is_a_json_500_on_a_kept_connection():
    import uvicorn
    from fastapi.responses import StreamingResponse

    from ember.serve.app import ServerConfig, build_app, make_state

    port = free_port()
    app = build_app(make_state(None, "none"), ServerConfig(port=port))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    @app.get("/boom-stream")
    async def boom_stream():
        async def events():
            yield "data: {}\n\n"
            raise RuntimeError("a bug mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            wait_healthy(f"http://127.0.0.1:{port}", thread)
            r = http.get("/boom", headers={"X-Request-Id": "abc"})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert r.headers["x-request-id"] == "abc"
            assert r.headers.get("connection") != "close"
            assert http.get("/health").status_code == 200
            lines = [line for line in http.get("/boom-stream").text.splitlines() if line]
            assert lines[-1] == "data: [DONE]" and "server_error" in lines[-2]
            assert http.get("/health").status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
