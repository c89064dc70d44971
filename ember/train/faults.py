"""Failures of a torchrun job, made survivable and legible.

- `die_with_parent()`: a worker is killed when its launcher dies (even by SIGKILL), never left training;
- `record_error(e)`: a worker's exception, written where torchrun reads it (TORCHELASTIC_ERROR_FILE);
- `run_torchrun(args, what)`: torchrun in this process; None, or one line naming the failed rank's cause;
- `restart_count()`: how often torchrun has restarted this worker's group (`--max-restarts`);
- `disk_full(e, directory)`: whether a failed write ran out of space (torch does not always say so).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
import traceback

from ember.process import die_with_parent as set_parent_death_signal

LAUNCHER_PID = "EMBER_LAUNCHER_PID"  # set by run_torchrun; a worker checks its parent is still that process


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere nothing happens).

    A torchrun worker's parent is the agent, which runs inside `ember train` itself (torchrun is called
    in-process, from the main thread, so it lives as long as the launcher does). The signal is tied to the
    parent existing at the call: if the launcher died before it, exit now rather than train as an orphan."""
    if not set_parent_death_signal():
        return  # not permitted here (or not Linux): the worker still trains, as before
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is not None and os.getppid() != int(launcher):
        os._exit(1)


def restart_count() -> int:
    """0 on the first attempt; N after torchrun restarted the whole group N times."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def record_error(e: BaseException) -> None:
    """Write `e` in torchrun's error-file format (as its `@record` would), plus the time to the
    microsecond: a rank that fails because a peer died fails after it, and the first one is the cause.
    A worker's first record stands (it is the error; what follows is cleaning up after it)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    now = time.time()
    data = {"message": {"message": f"{type(e).__name__}: {e}",
                        "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(now)),
                                      "time": now}}}
    with contextlib.suppress(OSError), open(path, "w") as f:
        json.dump(data, f)


def run_torchrun(args: list[str], what: str = "training", max_restarts: int = 0,
                 env: dict[str, str] | None = None) -> str | None:
    """`torchrun --max-restarts K ARGS` in this process (its agent starts the workers from this thread),
    with `env` set for the workers meanwhile; returns None when the workers succeeded, else the error
    line, e.g. `training failed on rank 1 (exit 1): ValueError: ...`."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    env = {**(env or {}), LAUNCHER_PID: str(os.getpid())}  # the workers inherit these at spawn
    if max_restarts:
        # The agent's shared TCPStore outlives a restart with the failed attempt's keys in it, and a
        # restarted gloo group may read a dead peer's address from them ("connectFullMesh failed ...
        # Connection refused"; pytorch/pytorch#135712): a store of its own per attempt instead.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        torchrun.main(["--max-restarts", str(max_restarts), *args])
    except ChildFailedError as e:  # torchrun has already stopped the other workers
        return describe_failure(e.failures, what)
    except Exception as e:  # noqa: BLE001 - the rendezvous or the agent itself failed
        return f"{what} failed: {type(e).__name__}: {_first_line(str(e))}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return None


def describe_failure(failures: dict, what: str = "training") -> str:
    """One line for torchrun's failures ({global rank: ProcessFailure}), naming the root cause."""
    rank, failure = root_failure(failures)
    message = _recorded_message(failure)
    exit_code = f" (exit {failure.exitcode})" if failure.exitcode >= 0 else ""  # (stopped by torchrun as it exited)
    if message:
        return f"{what} failed on rank {rank}{exit_code}: {message}"
    if failure.exitcode < 0:
        return f"{what} failed: rank {rank} was killed by {_signal_name(-failure.exitcode)}"
    return f"{what} failed on rank {rank}{exit_code} (no error recorded; see its output above)"


def root_failure(failures: dict) -> tuple[int, object]:
    """The failure that caused the others. When one rank fails, its peers fail after it (a collective
    loses its peer) or are stopped by torchrun with SIGTERM. So: a rank killed by another signal without
    a word (the OOM killer, `kill -9`, a crash) first, then the earliest recorded exception, then the rest."""
    def order(item):
        rank, f = item
        when = _recorded_time(f)
        if when is not None:
            return (1, when, rank)
        return (0 if f.exitcode < 0 and f.exitcode != -signal.SIGTERM else 2, f.timestamp, rank)

    return min(failures.items(), key=order)


def _recorded(failure) -> dict:
    """What the worker wrote in its error file ({"message": str, "extraInfo": {...}}), or {}: without
    one, torchrun makes a message up ("Signal 9 (SIGKILL) received by PID ...")."""
    file_data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
    data = file_data.get("message")
    if isinstance(data, str) and "timestamp" in file_data:  # the flat form: {"message": str, "timestamp": int}
        return {"message": data, "extraInfo": {"timestamp": file_data["timestamp"]}}
    return data if isinstance(data, dict) else {}  # (torchrun's stand-in for no file: {"message": "<NONE>"})


def _recorded_message(failure) -> str:
    message = _recorded(failure).get("message")
    return _first_line(message) if isinstance(message, str) else ""


def _recorded_time(failure) -> float | None:
    extra = _recorded(failure).get("extraInfo") or {}
    try:
        return float(extra.get("time", extra.get("timestamp")))
    except (TypeError, ValueError):
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def disk_full(e: BaseException, directory, low_bytes: int = 16 << 20) -> bool:
    """Whether a failed write into `directory` ran out of space: ENOSPC anywhere in the exception's
    chain, or (torch's serializer reports it as e.g. `unexpected pos 704 vs 598`) almost no space left."""
    import shutil

    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(directory).free < low_bytes
    except OSError:
        return False
