"""Data parallel: `ember router` over real ember servers. Prefix-aware placement keeps a multi-tenant
workload's prefix-cache hits near one replica's (round-robin loses them), and a replica killed mid-run
fails only its own in-flight requests while new ones go to the other."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import children_of
from tests.serve.conftest import free_port, running_server, wait_healthy
from tests.serve.test_shutdown import start, wait_ready
from tests.waiting import wait_until


@contextmanager
def running_router(urls: list[str], policy: str):
    import uvicorn

    from ember.serve.router import RouterConfig, build_router_app

    port = free_port()
    app = build_router_app(RouterConfig(tuple(urls), policy=policy))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, thread)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def multi_tenant_workload(vocab: int) -> list[list[int]]:
    """8 shared 1,024-token system prompts, 64 requests (each its own 16-token question), interleaved."""
    rng = random.Random(0)
    systems = [[rng.randrange(3, vocab) for _ in range(1024)] for _ in range(8)]
    prompts = [systems[i % 8] + [rng.randrange(3, vocab) for _ in range(16)] for i in range(64)]
    rng.shuffle(prompts)
    return prompts


def run_workload(base: str, prompts: list[list[int]]) -> None:
    def one(prompt):
        r = httpx.post(f"{base}/v1/completions", timeout=300,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text

    with ThreadPoolExecutor(8) as pool:  # 8 in flight, as a busy endpoint has them
        list(pool.map(one, prompts))


def hit_rate(servers) -> float:
    kvs = [s.llm.engine.kv for s in servers]
    return sum(kv.num_hit_tokens for kv in kvs) / sum(kv.num_queried_tokens for kv in kvs)


def reset(servers) -> None:
    for s in servers:  # idle now: no step runs while the counters and the cache are cleared
        kv = s.llm.engine.kv
        kv.reset_prefix_cache()
        kv.num_hit_tokens = kv.num_queried_tokens = 0


def test_prefix_routing_keeps_a_single_replicas_hit_rate(model_factory):
    path = model_factory("llama", max_position_embeddings=2048)
    prompts = multi_tenant_workload(512)
    with running_server(path, max_num_seqs=16) as a, running_server(path, max_num_seqs=16) as b:
        run_workload(a.base_url, prompts)
        single = hit_rate([a])
        rates = {}
        for policy in ("prefix", "round_robin"):
            reset([a, b])
            with running_router([a.base_url, b.base_url], policy) as router:
                run_workload(router, prompts)
                placed = httpx.get(f"{router}/router/replicas").json()["replicas"]
            assert sum(r["num_requests"] for r in placed) == 64
            assert all(r["num_requests"] > 0 for r in placed), placed  # both replicas worked
            rates[policy] = hit_rate([a, b])
    print(f"prefix-cache hit rate: one replica {single:.3f}, DP=2 prefix {rates['prefix']:.3f}, "
          f"round-robin {rates['round_robin']:.3f}")
    assert rates["prefix"] >= 0.9 * single
    assert rates["round_robin"] < rates["prefix"]


def test_router_refuses_bad_backends():
    from ember.serve.router import RouterConfig

    with pytest.raises(ValueError, match="backend: 'localhost:8000' is not an http"):
        RouterConfig(("localhost:8000",))
    with pytest.raises(ValueError, match="policy"):
        RouterConfig(("http://127.0.0.1:1",), policy="random")


def _replica_pid(launcher: int, url: str) -> int:
    port = url.rsplit(":", 1)[1]
    for child in children_of(launcher):
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"--port" in argv and argv[argv.index(b"--port") + 1] == port.encode():
            return int(child)
    raise AssertionError(f"no replica process on port {port}")


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs /proc/PID/task/PID/children to find the replicas")
def test_serve_data_parallel_survives_a_killed_replica(model_factory):
    path = model_factory("llama", max_position_embeddings=4096)
    port = free_port()
    proc = start(path, port, "--data-parallel-size", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        replicas = httpx.get(f"{base}/router/replicas").json()["replicas"]
        assert len(replicas) == 2 and all(r["healthy"] for r in replicas)
        events: list[str] = []
        streaming = threading.Event()

        def stream():
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3000, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        streaming.set()

        thread = threading.Thread(target=stream)
        thread.start()
        assert streaming.wait(120)
        busy = next(r for r in httpx.get(f"{base}/router/replicas").json()["replicas"] if r["in_flight"])
        os.kill(_replica_pid(proc.pid, busy["url"]), signal.SIGKILL)
        thread.join(120)
        assert not thread.is_alive()
        last = json.loads(events[-1].removeprefix("data: "))
        assert "replica" in last["error"]["message"], events[-1]  # its stream ended with a reason
        for i in range(8):  # new requests go to the live replica
            r = httpx.post(f"{base}/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": f"Question {i}", "max_tokens": 4})
            assert r.status_code == 200, r.text
        wait_until(lambda: not next(r for r in httpx.get(f"{base}/router/replicas").json()["replicas"]
                                    if r["url"] == busy["url"])["healthy"], timeout=30, what="the dead replica marked down")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        except Exception:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
