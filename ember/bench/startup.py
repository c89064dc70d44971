"""Start-up: seconds from launching a fresh process to its first generated token.

Three ways in, each a new process so imports and loading count: the offline `LLM`, `ember serve`
(until /health answers and a completion returns a token), and optionally vLLM's CPU build. The
C++ kernels compile once per machine (cached in ~/.cache/torch_extensions): a "cold" run points
TORCH_EXTENSIONS_DIR at an empty folder to include that compile, the other runs are warm.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

from ember._optional import optional_import

_OFFLINE = r"""
import sys
from ember import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype=sys.argv[2])
print("@@ ready", flush=True)
llm.generate([[5] * 16], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
print("@@ first", flush=True)
"""


def _wait_line(proc: subprocess.Popen, marker: str) -> float:
    for line in proc.stdout:
        if line.startswith(marker):
            return time.perf_counter()
    raise RuntimeError(f"the process exited ({proc.wait()}) before printing {marker!r}")


def offline(model: str, dtype: str, env: dict | None = None) -> tuple[float, float]:
    """(launch -> LLM ready, launch -> first token) seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _OFFLINE, model, dtype], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    ready = _wait_line(proc, "@@ ready")
    first = _wait_line(proc, "@@ first")
    proc.wait()
    return ready - start, first - start


def served(model: str, dtype: str, env: dict | None = None, timeout: float = 300) -> tuple[float, float]:
    """(launch -> /health 200, launch -> first completion token) seconds for `ember serve`."""
    httpx = optional_import("httpx", "bench", "HTTP benchmarks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "serve", "--model", model, "--dtype", dtype,
                             "--port", str(port), "--served-model-name", "m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None or time.perf_counter() - start > timeout:
                raise RuntimeError("ember serve did not become ready")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        ready = time.perf_counter()
        r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": [5] * 16, "max_tokens": 1}, timeout=60)
        r.raise_for_status()
        return ready - start, time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)


def vllm(python: str, model: str, dtype: str) -> tuple[float, float]:
    """(launch -> vLLM's LLM ready, launch -> first token) seconds."""
    from ember.bench.peers import VllmCpu

    start = time.perf_counter()
    peer = VllmCpu(python, model, dtype)
    ready = time.perf_counter()
    peer.latency([5] * 16, 1)
    first = time.perf_counter()
    peer.close()
    return ready - start, first - start


def cold_env() -> dict:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": tempfile.mkdtemp(prefix="ember-cold-ext-")}
