"""`ember serve` as a real process: SIGTERM lets in-flight requests finish, then exits 0."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.serve.conftest import free_port


def test_sigterm_drains_in_flight_requests(model_factory):
    model = model_factory("llama", max_position_embeddings=4096)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "serve", "--model", str(model), "--port", str(port),
         "--dtype", "float32", "--max-num-seqs", "4", "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert time.time() < deadline and proc.poll() is None, "the server did not become ready"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        result = {}

        def stream():
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2500, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                result["lines"] = [line for line in r.iter_lines() if line]

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.5)  # the request is running
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result["lines"][-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in result["lines"][-2]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
