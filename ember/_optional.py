"""Dependencies only some features need, imported where they are used (see pyproject's extras)."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def optional_import(module: str, extra: str, purpose: str) -> ModuleType:
    """`import module`, or a MissingDependency saying e.g. "plots need matplotlib: pip install 'ember[plot]'"."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name != module and not module.startswith(e.name + "."):
            raise  # the module is there but something it imports is not: its own error says more
        raise MissingDependency(f"{purpose} need {module.split('.')[0]}: pip install 'ember[{extra}]'",
                                name=module) from e
