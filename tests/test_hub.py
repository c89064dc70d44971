"""Hugging Face ids through the HF cache: a cache laid out on disk as huggingface_hub writes it
(blobs, snapshots/REV symlinks, refs/main), no network."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ember import hub
from ember.registry import resolve_model
from tests.models.gguf_files import write_gguf


def cache_repo(cache: Path, repo: str, files: dict[str, Path], revision: str = "main") -> Path:
    """Put `files` (name in repo -> local file) into `cache` as huggingface_hub would: content-addressed
    blobs, a snapshot folder of symlinks named by a commit hash, and refs/<revision> pointing at it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch, model_factory):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llama = model_factory("llama")
    cache_repo(cache, "ember-test/tiny-llama", {p.name: p for p in llama.iterdir() if p.is_file()})
    ggufs = {name: write_gguf(llama, tmp_path / name, name.split("-")[-1].removesuffix(".gguf"))
             for name in ("tiny-Q8_0.gguf", "tiny-Q4_0.gguf")}
    cache_repo(cache, "ember-test/tiny-GGUF", ggufs)
    return cache


def test_hf_ids_resolve_from_the_cache_without_network(hf_cache):
    snapshot = Path(resolve_model("ember-test/tiny-llama"))
    assert snapshot.parent.name == "snapshots" and (snapshot / "config.json").is_file()
    assert Path(resolve_model("ember-test/tiny-GGUF:Q4_0")).name == "tiny-Q4_0.gguf"
    assert Path(resolve_model("ember-test/tiny-GGUF:q8_0")).name == "tiny-Q8_0.gguf"  # tags ignore case
    assert Path(resolve_model("ember-test/tiny-GGUF", gguf_file="tiny-Q8_0.gguf")).name == "tiny-Q8_0.gguf"
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):  # two files and no Q4_K_M: not in the cache whole
        resolve_model("ember-test/tiny-GGUF")
    with pytest.raises(ValueError, match=r"not in the Hugging Face cache .*ember pull ember-test/absent"):
        resolve_model("ember-test/absent")


def test_pick_gguf_by_tag_default_and_parts():
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "mmproj-m-F16.gguf",
             "big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]
    ref = hub.RepoRef.parse("o/m")
    assert hub.pick_gguf(files[:4], ref) == ["m-Q4_K_M.gguf"]  # several: Q4_K_M, as Ollama picks
    assert hub.pick_gguf(files, hub.RepoRef.parse("o/m:Q8_0")) == ["m-Q8_0.gguf"]
    assert hub.pick_gguf(files, hub.RepoRef("o/m", gguf_file="big-Q4_K_M-00001-of-00002.gguf")) == files[4:]
    with pytest.raises(ValueError, match="has no Q2_K file"):
        hub.pick_gguf(files, hub.RepoRef.parse("o/m:Q2_K"))
    assert hub.pick_gguf(["only.gguf"], ref) == ["only.gguf"]


def test_revisions_pick_their_snapshot(hf_cache, model_factory):
    qwen = model_factory("qwen2")
    cache_repo(hf_cache, "ember-test/tiny-llama", {p.name: p for p in qwen.iterdir() if p.is_file()}, revision="v2")
    assert "Qwen2" in (Path(resolve_model("ember-test/tiny-llama", revision="v2")) / "config.json").read_text()
    assert "Llama" in (Path(resolve_model("ember-test/tiny-llama")) / "config.json").read_text()


def _ember(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_cli_serves_cached_ids_lists_them_and_refuses_clearly_offline(hf_cache):
    env = {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    out = _ember(env, "generate", "hello", "--model", "ember-test/tiny-GGUF:Q8_0", "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    listing = _ember(env, "models")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any("ember-test/tiny-llama" in line and "hf (LlamaForCausalLM)" in line for line in lines), listing.stdout
    assert any("ember-test/tiny-GGUF" in line and "gguf (Q4_0, Q8_0)" in line for line in lines), listing.stdout
    missing = _ember(env, "generate", "hello", "--model", "ember-test/absent")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert [line for line in missing.stderr.splitlines() if line.startswith("error:")] == [
        f"error: model: ember-test/absent is not in the Hugging Face cache ({hf_cache}) and HF_HUB_OFFLINE is set; "
        "run `ember pull ember-test/absent` where the hub is reachable (or unset HF_HUB_OFFLINE)"]
    shutil.rmtree(hf_cache)
    assert "none" in _ember(env, "models").stdout
