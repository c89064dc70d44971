"""Slow: a fresh venv from a clean clone serves the default model; the web page chats in Chromium."""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("EMBER_TEST_ARTIFACTS", ROOT / "test-artifacts"))
pytestmark = pytest.mark.slow


def wait_healthy(base: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else proc.returncode
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError("server did not become healthy")


def test_fresh_install_serves_the_default_model(tmp_path):
    """A non-editable install (a built wheel) from a clean clone, with an empty kernel cache: the C++ kernels
    are in the wheel and load (not PyTorch's fallback); `ember serve` says what it is doing before the first
    kernel build ends, is ready with the kernels built, and answers the first chat request."""
    import openai

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True, timeout=900)
    subprocess.run(pip + [str(clone)], check=True, timeout=900)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "kernels")}  # a first run's empty cache
    port = free_port()
    launched = time.monotonic()
    proc = subprocess.Popen([str(venv / "bin" / "ember"), "serve", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic() - launched, line) for line in proc.stdout),
                              daemon=True)
    reader.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, 600)
        ready = time.monotonic() - launched
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        text = ""
        for chunk in client.chat.completions.create(model="default", stream=True, max_tokens=24,
                                                    messages=[{"role": "user", "content": "What is a list?"}]):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        answered = time.monotonic() - launched
        assert text.strip()
        seen = list(lines)
        first_said = seen[0][0]
        built = [t for t, line in seen if line.startswith("compiled ")]
        assert seen[0][1].startswith("ember "), seen[:3]  # the first thing it does is say what it is doing
        assert built and first_said < built[0]  # ... long before the first kernel build is done
        # a kernel the CPU can run but that failed to build says "unavailable" (a CPU without AVX512-BF16
        # rightly runs bf16 on PyTorch's ops, and says so in its "CPU kernels:" line)
        assert not any("unavailable" in line for _, line in seen), seen
        print(f"first line {first_said:.1f} s after launch, ready {ready:.1f} s, first chat answered "
              f"{answered - ready:.1f} s after ready ({len(built)} kernel builds)")
    finally:
        proc.terminate()
        proc.wait(30)
    check = ("from ember.models import cpu_ops; from ember.engine.attention.cpu_paged import load_kernels; "
             "import ember, sys; print(ember.__file__, cpu_ops._library(), load_kernels())")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", check], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert str(venv) in out[0] and out[1:] == ["True", "True"], out  # the installed copy, its kernels built


def test_web_chat_page_in_chromium(llama_dir, tmp_path):
    """The page recovers after an error, stops mid-answer, resets cleanly and trims a conversation that
    outgrows the context (a 512-token context here), saying so."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "serve", str(llama_dir), "--port", str(port),
                             "--api-key", "k3y", "--max-model-len", "512", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, 120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            idle = "!document.querySelector('#send').disabled"
            # 1. an error (a wrong key) leaves the page usable, the message back in the box
            page.fill("#api-key", "wrong")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "16")
            page.fill("#input", "Hello there")
            page.click("#send")
            page.wait_for_selector(".msg.error", timeout=60000)
            page.wait_for_function(idle)
            assert "API key" in page.locator(".msg.error").inner_text()
            assert page.input_value("#input") == "Hello there"
            # 2. ... and the next message goes through, with a sane rate readout
            page.fill("#api-key", "k3y")
            page.click("#send")
            page.wait_for_function("document.querySelector('#stats').textContent.includes('tokens/s')", timeout=60000)
            assert page.locator(".msg.user").last.inner_text() == "Hello there"
            assert page.locator(".msg.assistant").count() == 1
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web_chat.png"))
            # 3. Stop mid-answer: the partial answer stays, no error. The tiny model writes its whole answer in
            # milliseconds (greedy, it ends at 50 tokens), so the answer arrives over a slow link (Chromium's
            # network throttling: 2 KB/s), which keeps it in progress until the click, on any machine.
            network = page.context.new_cdp_session(page)
            network.send("Network.enable")
            network.send("Network.emulateNetworkConditions",
                         {"offline": False, "latency": 0, "downloadThroughput": 2048, "uploadThroughput": -1})
            page.fill("#max-tokens", "99999")  # clamped to the context
            page.fill("#input", "Tell me a long story")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                                   "!document.querySelector('.msg.assistant:last-of-type').classList.contains('pending')"
                                   " && document.querySelector('.msg.assistant:last-of-type').textContent.length > 0",
                                   timeout=60000)
            page.click("#stop")
            page.wait_for_function(idle)
            assert page.locator(".msg.assistant").count() == 2 and page.locator(".msg.assistant").last.inner_text()
            network.send("Network.emulateNetworkConditions",
                         {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
            assert page.locator(".msg.error").count() == 1  # only step 1's
            assert int(page.input_value("#max-tokens")) <= 511
            # 4. Reset mid-answer: an empty page, no AbortError bubble
            page.fill("#input", "Another one")
            page.click("#send")
            page.click("#reset")
            page.wait_for_function(idle)
            assert page.locator(".msg").count() == 0
            # 5. a conversation longer than the context: the oldest turns are left out, and the page says so
            page.fill("#max-tokens", "64")
            long_message = "word " * 60  # ~120 tokens with this model's small vocabulary
            for _ in range(3):
                page.fill("#input", long_message)
                page.click("#send")
                page.wait_for_function(idle, timeout=60000)
            assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").all_inner_texts()
            assert "left out" in page.locator(".note").last.inner_text()
            page.screenshot(path=str(ARTIFACTS / "web_chat_trimmed.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
