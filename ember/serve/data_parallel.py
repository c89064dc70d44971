"""`ember serve --data-parallel-size N`: N `ember serve` replicas on loopback ports behind `ember router`
on the address the user asked for. Each replica is a whole engine process with its own share of the cores
(pinned to them) and dies with the launcher; the launcher waits until every replica answers /health,
saying so, and stops them when it stops.

With `--distributed-executor ray` each replica is started by a Ray actor (one per replica, `--threads` CPUs
each) on whichever node of the cluster Ray places it, listening on that node's address; the router stays
with the launcher."""

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


def replica_argv(argv: list[str], port: int, threads: int | None, host: str = "127.0.0.1") -> list[str]:
    """`ember serve ...` arguments for one replica: the user's, on host:`port`."""
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
    out += ["--host", host, "--port", str(port)]
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
        ranks = _flag(serve_argv, "--tensor-parallel-size") or 1  # --threads is per rank
        self.processes: list[subprocess.Popen] = []
        self.urls: list[str] = []
        for i in range(count):
            port = _free_port()
            mine = set(cores[i * per:(i + 1) * per]) if len(cores) >= count else None

            def setup(mine=mine):
                die_with_parent()
                if mine:
                    os.sched_setaffinity(0, mine)

            argv = [sys.executable, "-m", "ember.cli", *replica_argv(serve_argv, port, max(1, per // ranks))]
            # (started on the launcher's main thread, which lives as long as it: PDEATHSIG follows the thread)
            self.processes.append(subprocess.Popen(argv, preexec_fn=setup))  # noqa: PLW1509 (no threads yet)
            self.urls.append(f"http://127.0.0.1:{port}")
        logger.info("data parallel: %d replicas (%d core(s) each) on %s; pids %s", count, per,
                    " ".join(self.urls), " ".join(str(p.pid) for p in self.processes))

    def exit_code(self, i: int) -> int | None:
        return self.processes[i].poll()

    def wait_ready(self) -> None:
        """Until every replica answers /health; raises if one exits first."""
        pending = dict(enumerate(self.urls))
        while pending:
            for i, url in list(pending.items()):
                if (code := self.exit_code(i)) is not None:
                    raise RuntimeError(f"replica {url} exited (code {code}) while starting")
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        del pending[i]
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


class ReplicaProcess:
    """Runs one `ember serve` replica on its node (a Ray actor's body, wrapped with `ray.remote` at start)."""

    def start(self, serve_argv: list[str], threads: int) -> str:
        import ray

        host = ray.util.get_node_ip_address()
        port = _free_port()
        argv = [sys.executable, "-m", "ember.cli", *replica_argv(serve_argv, port, threads, host)]
        self.process = subprocess.Popen(argv, preexec_fn=die_with_parent)  # noqa: PLW1509 (no threads yet)
        return f"http://{host}:{port}"

    def poll(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout: float) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class RayReplicas(Replicas):
    def __init__(self, serve_argv: list[str], count: int, threads: int):
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=False)  # RAY_ADDRESS or a local cluster, as Ray decides
        actor_class = ray.remote(num_cpus=threads)(ReplicaProcess)
        self.actors = [actor_class.remote() for _ in range(count)]
        self.urls = ray.get([a.start.remote(serve_argv, threads) for a in self.actors])
        logger.info("data parallel: %d replicas on the Ray cluster (%d CPU(s) each): %s", count, threads,
                    " ".join(self.urls))

    def exit_code(self, i: int) -> int | None:
        import ray

        try:
            return ray.get(self.actors[i].poll.remote(), timeout=30)
        except Exception:  # the actor (or its node) is gone
            return -1

    def stop(self, timeout: float = 60.0) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.stop.remote(timeout), timeout=timeout + 30)
            except Exception:  # already gone: its replica died with it (PDEATHSIG)
                pass
            ray.kill(actor)


def _flag(serve_argv: list[str], flag: str) -> int | None:
    for i, arg in enumerate(serve_argv):
        if arg == flag and i + 1 < len(serve_argv):
            return int(serve_argv[i + 1])
        if arg.startswith(f"{flag}="):
            return int(arg.partition("=")[2])
    return None


def _ray_threads(serve_argv: list[str]) -> int:
    return _flag(serve_argv, "--threads") or 1


def serve_data_parallel(serve_argv: list[str], count: int, sock, host: str, port: int, policy: str,
                        executor: str = "mp") -> int:
    from ember.serve.router import RouterConfig, run_router

    replicas = RayReplicas(serve_argv, count, _ray_threads(serve_argv)) if executor == "ray" \
        else Replicas(serve_argv, count)
    try:
        replicas.wait_ready()
        return run_router(RouterConfig(tuple(replicas.urls), policy=policy), host, port, sock)
    finally:
        replicas.stop()
