"""`ember serve --data-parallel-size N`: N `ember serve` replicas on loopback ports behind `ember router`
on the address the user asked for. Each replica is a whole engine process with its own share of the cores
(pinned to them) and dies with the launcher; the launcher waits until every replica answers /health,
saying so, and stops them when it stops."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import httpx

from ember.process import die_with_parent

logger = logging.getLogger("ember.serve")

_OWN_FLAGS = ("--port", "--host", "--data-parallel-size")  # the launcher's, not the replicas'


def replica_argv(argv: list[str], port: int, threads: int | None) -> list[str]:
    """`ember serve ...` arguments for one replica: the user's, on 127.0.0.1:`port`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _OWN_FLAGS:
            skip = True
            continue
        if arg.startswith(tuple(f"{flag}=" for flag in _OWN_FLAGS)):
            continue
        out.append(arg)
    out += ["--host", "127.0.0.1", "--port", str(port)]
    if threads is not None and not any(a == "--threads" or a.startswith("--threads=") for a in argv):
        out += ["--threads", str(threads)]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replicas:
    def __init__(self, serve_argv: list[str], count: int):
        cores = sorted(os.sched_getaffinity(0))
        per = max(1, len(cores) // count)
        self.processes: list[subprocess.Popen] = []
        self.urls: list[str] = []
        for i in range(count):
            port = _free_port()
            mine = set(cores[i * per:(i + 1) * per]) if len(cores) >= count else None

            def setup(mine=mine):
                die_with_parent()
                if mine:
                    os.sched_setaffinity(0, mine)

            argv = [sys.executable, "-m", "ember.cli", *replica_argv(serve_argv, port, per)]
            self.processes.append(subprocess.Popen(argv, preexec_fn=setup))  # noqa: PLW1509 (no threads yet)
            self.urls.append(f"http://127.0.0.1:{port}")
        logger.info("data parallel: %d replicas (%d core(s) each) on %s; pids %s", count, per,
                    " ".join(self.urls), " ".join(str(p.pid) for p in self.processes))

    def wait_ready(self) -> None:
        """Until every replica answers /health; raises if one exits first."""
        pending = dict(zip(self.urls, self.processes))
        while pending:
            for url, process in list(pending.items()):
                if process.poll() is not None:
                    raise RuntimeError(f"replica {url} exited (code {process.returncode}) while starting")
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        del pending[url]
                        logger.info("replica %s is ready", url)
                except httpx.HTTPError:
                    pass
            if pending:
                time.sleep(0.5)  # polling a process that is loading a model: nothing to wait on instead

    def stop(self, timeout: float = 60.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def serve_data_parallel(serve_argv: list[str], count: int, sock, host: str, port: int, policy: str) -> int:
    from ember.serve.router import RouterConfig, run_router

    replicas = Replicas(serve_argv, count)
    try:
        replicas.wait_ready()
        return run_router(RouterConfig(tuple(replicas.urls), policy=policy), host, port, sock)
    finally:
        replicas.stop()
