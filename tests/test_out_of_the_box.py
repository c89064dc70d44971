"""Slow: a fresh venv from a clean clone serves the default model; the web page chats in Chromium."""

import os
import shutil
import subprocess
import sys
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
    import openai

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True, timeout=900)
    subprocess.run(pip + [str(clone)], check=True, timeout=900)
    installed = time.time()
    port = free_port()
    proc = subprocess.Popen([str(venv / "bin" / "ember"), "serve", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, 110)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        text = ""
        for chunk in client.chat.completions.create(model="default", stream=True, max_tokens=24,
                                                    messages=[{"role": "user", "content": "What is a list?"}]):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        assert text.strip()
        assert time.time() - installed < 120
    finally:
        proc.terminate()
        proc.wait(30)


def test_web_chat_page_in_chromium(llama_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    port = free_port()
    model = ["--model", str(llama_dir)] if not (ROOT / "ember" / "default_model" / "config.json").exists() else []
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "serve", "--port", str(port), "--api-key", "k3y",
                             *model], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, 120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#api-key", "k3y")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "16")
            page.fill("#input", "Hello there")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length > 0 && "
                                   "document.querySelector('#stats').textContent.includes('tokens/s')", timeout=60000)
            assert page.locator(".msg.user").inner_text() == "Hello there"
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web_chat.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
