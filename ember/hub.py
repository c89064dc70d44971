"""Hugging Face hub ids: `org/name` (and `org/name:Q4_K_M` for a GGUF repo) -> a local path.

Resolved through `huggingface_hub` and its cache, as vLLM does, with one difference: a model
already in the cache is used as it is, without asking the hub (a start never waits on the
network; `ember pull` refreshes it). A model not in the cache is downloaded, with the hub's own
progress bars, unless HF_HUB_OFFLINE is set. The cache is the one every HF tool shares:
$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# What an HF-format model needs (weights in safetensors only; .bin/.pt/.onnx are skipped).
HF_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "1_Pooling/*"]
DEFAULT_QUANT = "Q4_K_M"  # what Ollama and the hub's own "run this GGUF" snippets pick
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "/")) and ".." not in name


def cache_dir() -> Path:
    """The HF hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


@dataclass(frozen=True)
class RepoRef:
    repo: str
    quant: str | None = None  # org/name:QUANT
    revision: str | None = None
    gguf_file: str | None = None

    @classmethod
    def parse(cls, name: str, revision: str | None = None, gguf_file: str | None = None) -> "RepoRef":
        repo, _, quant = name.partition(":")
        return cls(repo, quant or None, revision, gguf_file)

    def __str__(self) -> str:
        return self.repo + (f":{self.quant}" if self.quant else "") + (f"@{self.revision}" if self.revision else "")


def pick_gguf(files: list[str], ref: RepoRef) -> list[str]:
    """The file(s) of a GGUF repo to use (a split model's parts), by --gguf-file, by the :QUANT tag,
    alone, or Q4_K_M; an error listing the choices otherwise."""
    ggufs = sorted(f for f in files if f.endswith(".gguf") and "mmproj" not in Path(f).name.lower())
    if ref.gguf_file:
        chosen = [f for f in ggufs if f == ref.gguf_file or Path(f).name == ref.gguf_file]
        if not chosen:
            raise ValueError(f"gguf_file: {ref.gguf_file!r} is not in {ref.repo} (it has: {', '.join(ggufs) or 'none'})")
        return _with_parts(chosen[0], ggufs)
    tag = ref.quant or (None if len(ggufs) == 1 else DEFAULT_QUANT)
    if tag is None:
        return ggufs
    pattern = re.compile(rf"(^|[^A-Za-z0-9]){re.escape(tag)}([^A-Za-z0-9]|$)", re.IGNORECASE)
    chosen = [f for f in ggufs if pattern.search(Path(f).name)]
    if not chosen:
        why = f"has no {tag} file" if ref.quant else f"holds {len(ggufs)} GGUF files"
        raise ValueError(f"model: {ref.repo} {why}; pick one with {ref.repo}:QUANT or --gguf-file "
                         f"(files: {', '.join(ggufs) or 'none'})")
    return _with_parts(chosen[0], ggufs)


def _with_parts(first: str, ggufs: list[str]) -> list[str]:
    m = re.match(r"^(.*)-\d{5}-of-(\d{5})\.gguf$", first)
    if not m:
        return [first]
    return [f for f in ggufs if re.match(rf"^{re.escape(m[1])}-\d{{5}}-of-{m[2]}\.gguf$", f)]


def _model_path(snapshot: Path, ref: RepoRef) -> Path | None:
    """What to load from a snapshot folder, or None if it lacks the files needed."""
    files = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
    if (snapshot / "config.json").is_file() and not (ref.quant or ref.gguf_file):
        has_weights = any(f.endswith(".safetensors") for f in files)
        return snapshot if has_weights and (snapshot / "tokenizer.json").is_file() else None
    if not any(f.endswith(".gguf") for f in files):
        return None
    try:
        chosen = pick_gguf(files, ref)
    except ValueError:
        return None
    return snapshot / chosen[0] if chosen else None


def cached(ref: RepoRef) -> Path | None:
    """The model's path in the HF cache, without the network; None if it is not there (whole)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(ref.repo, revision=ref.revision, cache_dir=cache_dir(), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return _model_path(Path(snapshot), ref)


def download(ref: RepoRef) -> Path:
    """Fetch the model into the HF cache (only the files ember loads) and return its path."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        files = HfApi().list_repo_files(ref.repo, revision=ref.revision)
        if "config.json" in files and not (ref.quant or ref.gguf_file):
            patterns = HF_FILES
        else:
            patterns = pick_gguf(files, ref) + ["*.json"]  # a GGUF repo's config.json, README metadata: small
        print(f"downloading {ref} into {cache_dir()} ...", flush=True)
        snapshot = snapshot_download(ref.repo, revision=ref.revision, cache_dir=cache_dir(), allow_patterns=patterns)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ValueError(f"model: {ref} was not found on the Hugging Face hub ({str(e).splitlines()[0]})") from None
    except HFValidationError as e:
        raise ValueError(f"model: {ref.repo!r} is not a valid hub id ({e})") from None
    except ValueError:
        raise
    except Exception as e:  # no network, a proxy, a gated repo without a token: httpx's and the hub's errors
        detail = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise ValueError(f"model: cannot download {ref} from the Hugging Face hub ({detail}); check the network "
                         "(or HF_TOKEN for a gated model), or copy it into the cache") from None
    path = _model_path(Path(snapshot), ref)
    if path is None:
        raise ValueError(f"model: {ref} has no weights ember can load (safetensors with config.json and "
                         "tokenizer.json, or a .gguf file)")
    return path


def resolve(ref: RepoRef) -> Path:
    """The local path of a hub model: from the cache, else downloaded (unless offline)."""
    path = cached(ref)
    if path is not None:
        return path
    if offline():
        raise ValueError(f"model: {ref} is not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is set; "
                         f"run `ember pull {ref.repo}{':' + ref.quant if ref.quant else ''}` where the hub is "
                         "reachable (or unset HF_HUB_OFFLINE)")
    return download(ref)


@dataclass
class CachedModel:
    repo: str
    size_bytes: int
    format: str  # "hf (LlamaForCausalLM)", "gguf (Q4_K_M, Q8_0)", ...
    path: Path


def cached_models() -> list[CachedModel]:
    """The models in the HF cache (their newest snapshot each), for `ember models`."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir())
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: r.last_modified)
        names = [f.file_name for f in revision.files]
        ggufs = [n for n in names if n.endswith(".gguf") and "mmproj" not in n.lower()]
        if ggufs:
            tags = sorted({m[1] for n in ggufs if (m := re.search(r"((?:I?Q\d[\w]*)|F16|BF16|F32)", n, re.IGNORECASE))})
            fmt = f"gguf ({', '.join(tags) or len(ggufs)})"
        elif "config.json" in names:
            fmt = f"hf ({_architecture(revision.snapshot_path / 'config.json')})"
        else:
            continue
        found.append(CachedModel(repo.repo_id, repo.size_on_disk, fmt, revision.snapshot_path))
    return found


def _architecture(config: Path) -> str:
    import json

    try:
        return ", ".join(json.loads(config.read_text()).get("architectures") or ["?"])
    except (OSError, ValueError):
        return "?"
