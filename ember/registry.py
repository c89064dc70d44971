"""Model names: the embedded default model, the models folder, and Hugging Face hub ids.

`--model` accepts a path (an HF directory, a .gguf file or a directory holding one), "default",
the name of a model in ~/.cache/ember/models (or $EMBER_MODELS: directories, or .gguf files by
their stem), or a hub id (`org/name`, `org/name:Q4_K_M`; see hub.py). Resolved once, at the edge
(CLI, `LLM(...)`), into a local path.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DEFAULT_NAME = "default"


def default_model_dir() -> Path | None:
    path = Path(str(resources.files("ember").joinpath("default_model")))
    return path if (path / "config.json").is_file() else None


def models_folder() -> Path:
    return Path(os.environ.get("EMBER_MODELS") or Path.home() / ".cache" / "ember" / "models")


def list_models() -> dict[str, Path]:
    found: dict[str, Path] = {}
    default = default_model_dir()
    if default is not None:
        found[DEFAULT_NAME] = default
    folder = models_folder()
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            if (child / "config.json").is_file() or any(child.glob("*.gguf")):
                found.setdefault(child.name, child)
            elif child.suffix == ".gguf" and child.is_file():
                found.setdefault(child.stem, child)
    return found


def resolve_model(model: str | os.PathLike | None, revision: str | None = None, gguf_file: str | None = None) -> str:
    """A path, a known name, a hub id, or None (the default model) -> a local model path."""
    if model is None or str(model) == DEFAULT_NAME:
        default = default_model_dir()
        if default is None:
            raise ValueError("model: no default model is installed with this copy of ember; give one with --model DIR")
        return str(default)
    path = Path(model).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        if gguf_file is not None and path.is_dir():
            return str(path / gguf_file)
        return str(path)
    if path.exists():
        raise ValueError(f"model: {str(model)!r} is a file but not a .gguf file; give a model directory or a GGUF")
    named = list_models().get(str(model))
    if named is not None:
        return str(named)
    from ember import hub

    if hub.looks_like_repo_id(str(model)):
        return str(hub.resolve(hub.RepoRef.parse(str(model), revision, gguf_file)))
    known = ", ".join(list_models()) or "none"
    raise ValueError(f"model: {str(model)!r} is not a directory, a .gguf file, a known model name (known: {known}) "
                     "or a Hugging Face id (org/name)")
