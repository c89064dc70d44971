"""Compute threads that follow the CPU this process actually gets.

Every parallel region of a step (a product, an attention pass, a norm) ends in a barrier, so it
runs at the speed of its slowest thread. When another process takes one of the cores, one of
ember's threads waits a scheduler time slice (milliseconds) at every barrier of a step made of
microsecond-sized ops: two threads then ran W1 at an eighth of their quiet speed, where one thread
would have kept about half of it. So the engine watches the one figure that says so directly,
the time its threads spent runnable but waiting for a core (the scheduler's run-queue delay,
/proc/self/task/*/schedstat), and runs one thread fewer while that is high. Every so often it
tries one more again (the competitor may have gone), backing off while the answer stays no.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

WINDOW_S = 0.5  # how much wall time one reading covers
CONTENDED = 0.25  # threads' worth of run-queue wait per second of wall time that means "a core is gone"
FIRST_PROBE_S = 4.0  # after stepping down, when to try one more thread again
LAST_PROBE_S = 64.0  # the longest wait between tries


def run_queue_wait_s() -> float | None:
    """Seconds all of this process's threads have spent runnable but not running; None where the
    kernel does not say (no /proc, or built without schedstats)."""
    total, read = 0, False
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
                read = True
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended meanwhile (or no schedstat at all: then nothing is read)
    except OSError:
        return None
    return total / 1e9 if read else None


DEFAULT_THREADS = torch.get_num_threads()  # torch's choice for this machine (physical cores), before any change


class ThreadGovernor:
    """Told when each engine step starts and ends; changes torch's intra-op thread count at most once per
    window of stepping (a pause between steps starts a new window: idle time says nothing about the CPU)."""

    def __init__(self, max_threads: int, clock=time.monotonic, wait_reader=run_queue_wait_s):
        self.max_threads = max_threads
        self.threads = max_threads
        self.clock, self.wait_reader = clock, wait_reader
        self.enabled = max_threads > 1 and wait_reader() is not None
        self.window_start = clock()
        self.wait_start = wait_reader() if self.enabled else None
        self.probe_after = FIRST_PROBE_S
        self.next_probe: float | None = None
        self.probing = False
        self.last_end: float | None = None
        if self.enabled:
            torch.set_num_threads(max_threads)

    def before_step(self) -> None:
        if not self.enabled or self.last_end is None:
            return
        now = self.clock()
        if now - self.last_end > WINDOW_S:  # the engine sat idle: start the window afresh
            self.window_start, self.wait_start = now, self.wait_reader()

    def after_step(self) -> None:
        if not self.enabled:
            return
        now = self.last_end = self.clock()
        if now - self.window_start < WINDOW_S:
            return
        wait = self.wait_reader()
        waiting = (wait - self.wait_start) / (now - self.window_start)  # threads' worth, on average
        self.window_start, self.wait_start = now, wait
        if waiting >= CONTENDED and self.threads > 1:
            if self.probing:  # the extra thread still finds no free core: wait longer before the next try
                self.probe_after = min(self.probe_after * 2, LAST_PROBE_S)
            self._set(self.threads - 1, f"its threads waited {waiting:.2f} s per s for a core")
            self.next_probe, self.probing = now + self.probe_after, False
        elif self.probing:  # the try held: keep it, and try the next one soon
            self.probing = False
            self.probe_after = FIRST_PROBE_S
            self.next_probe = now + self.probe_after if self.threads < self.max_threads else None
        elif self.next_probe is not None and now >= self.next_probe and self.threads < self.max_threads:
            self._set(self.threads + 1, "trying one more")
            self.probing = True

    def _set(self, threads: int, why: str) -> None:
        logger.debug("compute threads %d -> %d (%s)", self.threads, threads, why)
        self.threads = threads
        torch.set_num_threads(threads)
