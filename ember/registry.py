"""Model names: the embedded default model, and directories under the models folder.

`--model` accepts a path, "default", or the name of a directory in ~/.cache/ember/models
(or $EMBER_MODELS). Resolved once, at the edge (CLI, `LLM(...)`), into a directory path.
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
            if (child / "config.json").is_file():
                found.setdefault(child.name, child)
    return found


def resolve_model(model: str | os.PathLike | None) -> str:
    """A path, a known name, or None (the default model) -> a model directory."""
    if model is None or str(model) == DEFAULT_NAME:
        default = default_model_dir()
        if default is None:
            raise ValueError("model: no default model is installed with this copy of ember; give one with --model DIR")
        return str(default)
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    named = list_models().get(str(model))
    if named is not None:
        return str(named)
    known = ", ".join(list_models()) or "none"
    raise ValueError(f"model: {str(model)!r} is neither a directory nor a known model name (known: {known})")
