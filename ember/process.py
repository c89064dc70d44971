"""Process housekeeping shared by the trainer's and the engine's worker processes."""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
from concurrent.futures import Future

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits, even by SIGKILL (Linux; elsewhere,
    or where it is not permitted, nothing happens and False is returned)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


_keeper_requests = None
_keeper_lock = threading.Lock()


def _forget_keeper() -> None:  # a forked child has none of its parent's threads
    global _keeper_requests, _keeper_lock
    _keeper_requests, _keeper_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_keeper)


def _keep(requests: queue.Queue) -> None:
    while True:
        start, future = requests.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(start())
            except BaseException as e:  # the caller's to raise
                future.set_exception(e)


def start_from_keeper(start):
    """`start()` (which starts child processes) run on one thread that lives as long as this process, and its
    result. PR_SET_PDEATHSIG fires when the *thread* that started a child ends, not its process: children an
    engine starts from a short-lived thread (a thread pool's, a server's start-up task) would be killed with
    it. Started from here, they die with the process, and only then."""
    global _keeper_requests
    with _keeper_lock:
        if _keeper_requests is None:
            _keeper_requests = queue.Queue()
            threading.Thread(target=_keep, args=(_keeper_requests,), name="ember-process-keeper", daemon=True).start()
    future = Future()
    _keeper_requests.put((start, future))
    return future.result()
