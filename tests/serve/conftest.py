"""A real uvicorn server on a free loopback port, in a background thread of the test process."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager

import httpx
import pytest

from tests.waiting import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, thread: threading.Thread, timeout: float = 120.0) -> None:
    """Until the server in `thread` answers /health with 200 (it is still starting while the port
    refuses connections); fails the test if the thread ends first or after `timeout` seconds."""

    def healthy() -> bool:
        assert thread.is_alive(), "the server thread ended before it was ready"
        try:
            return httpx.get(f"{base}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout, what=f"{base}/health")


class RunningServer:
    def __init__(self, server, thread, base_url, llm):
        self.server, self.thread, self.base_url, self.llm = server, thread, base_url, llm

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextmanager
def running_server(model_dir, model_name="tiny", api_key=None, max_body_mb=1.0, max_waiting=None, lora_modules=None,
                   allow_runtime_lora_updating=False, **engine_kwargs):
    import uvicorn

    from ember.engine.async_llm import AsyncLLM
    from ember.serve.app import ServerConfig, build_app, make_state

    engine_kwargs.setdefault("dtype", "float32")
    llm = AsyncLLM.from_args(str(model_dir), max_waiting=max_waiting, **engine_kwargs)
    port = free_port()
    config = ServerConfig(port=port, api_key=api_key, max_body_mb=max_body_mb,
                          allow_runtime_lora_updating=allow_runtime_lora_updating)
    app = build_app(make_state(llm, model_name, lora_modules=lora_modules), config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, thread)
    running = RunningServer(server, thread, base, llm)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def server(llama_dir):
    with running_server(llama_dir, max_num_seqs=128) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@contextmanager
def running_server_for(embedding_model_dir, model_name="tiny"):
    """A real server for an embedding model (no generation engine)."""
    import uvicorn

    from ember.engine.embed import EmbeddingEngine
    from ember.serve.app import ServerConfig, build_app, make_state

    port = free_port()
    app = build_app(make_state(None, model_name, EmbeddingEngine(str(embedding_model_dir), dtype="float32")),
                    ServerConfig(port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, thread)
    running = RunningServer(server, thread, base, None)
    try:
        yield running
    finally:
        running.stop()
