"""`ember serve` as a real process: a busy port fails at once; SIGTERM lets in-flight requests finish
and exits 0; past the drain time, requests end with a reason; Ctrl-C is quiet."""

import os
import signal
import socket
import subprocess
import sys
import threading

import httpx

from tests.serve.conftest import free_port
from tests.waiting import wait_until


def start(model, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "serve", str(model), "--port", str(port), "--dtype", "float32",
         "--max-num-seqs", "4", "--served-model-name", "tiny", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def wait_ready(proc: subprocess.Popen, base: str) -> None:
    def ready() -> bool:
        assert proc.poll() is None, "the server exited before it was ready"
        try:
            return httpx.get(f"{base}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=300, interval=0.2, what="the server to become ready")


def stream_in_background(base: str, result: dict, started: threading.Event) -> threading.Thread:
    def stream():
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3000, "stream": True, "ignore_eos": True}
        lines = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
        result["lines"] = lines

    t = threading.Thread(target=stream)
    t.start()
    return t


def signal_mid_stream(model_factory, sig: int, drain_timeout: str) -> tuple[list[str], int, str]:
    """Start `ember serve`, stream a long completion, send `sig` once it streams: (the SSE lines the client
    got, the exit status, the server's output)."""
    model = model_factory("llama", max_position_embeddings=4096)
    port = free_port()
    proc = start(model, port, "--drain-timeout", drain_timeout)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        result, started = {}, threading.Event()
        t = stream_in_background(base, result, started)
        assert started.wait(120)  # the request is streaming
        proc.send_signal(sig)
        t.join(600)
        return result["lines"], proc.wait(120), proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sigterm_drains_in_flight_requests(model_factory):
    # The request must finish within the drain time: one far above what its 3,000 tokens take on a
    # loaded machine, so only a server that does not drain fails this.
    lines, status, _ = signal_mid_stream(model_factory, signal.SIGTERM, "600")
    assert lines[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in lines[-2]
    assert status == 0


def test_ctrl_c_past_the_drain_time_ends_requests_with_a_reason_and_no_traceback(model_factory):
    lines, status, output = signal_mid_stream(model_factory, signal.SIGINT, "0.5")
    assert lines[-1] == "data: [DONE]"
    assert "shutting down" in lines[-2], lines[-3:]
    assert status == 130  # the shell's status for Ctrl-C
    assert "Traceback" not in output, output[-3000:]


def test_a_busy_port_fails_at_once_in_one_line(model_factory):
    model = model_factory("llama")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = start(model, port)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert out.strip().splitlines() == [f"error: port: {port} on 127.0.0.1 is already in use; pick another with --port"]
