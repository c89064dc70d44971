"""Waiting on a condition instead of sleeping a fixed time: a loaded machine (CI's two shared cores) may
take many times longer than a quiet one, so the bound is generous and only a hang reaches it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 120.0, interval: float = 0.05,
               what: str = "the condition") -> T:
    """Poll `condition()` until it returns something truthy, and return that; fail the test if it has
    not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
