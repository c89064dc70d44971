"""Tiny training setups: a tokenizer, a text corpus and a from-scratch Llama config, written per test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def write_config(directory: Path, assets: Path, **overrides) -> Path:
    config = {
        "model": {"tokenizer": str(assets / "tok"), "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 128},
        "data": {"train": [str(assets / "train.txt")], "seq_len": 32},
        "run_dir": str(directory / "run"),
        "zero_stage": 0,
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "max_steps": 20,
        "seed": 0,
        "device": "cpu",  # CPU even where a GPU is present: the references are CPU runs (tests/test_gpu.py covers CUDA)
        "optimizer": {"lr": 0.003, "warmup_steps": 3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, nproc: int = 1, timeout: int = 300) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "ember.cli", "train", "--nproc", str(nproc), str(config)],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = Path(yaml.safe_load(config.read_text())["run_dir"])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}


def processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm)", which may hold spaces
        table[int(entry.name)] = (int(fields[1]), fields[0], cmdline)
    return table


def job_workers(job_pid: int) -> list[int]:
    """The live training ranks this test's job started: its own children running ember.train.launch
    (by parent pid, so other jobs on the machine are never touched)."""
    return sorted(pid for pid, (ppid, state, cmdline) in processes().items()
                  if ppid == job_pid and state != "Z" and "ember.train.launch" in cmdline)


def is_worker_alive(pid: int) -> bool:
    """Whether `pid` is still a running (not zombie) training worker."""
    info = processes().get(pid)
    return info is not None and info[1] != "Z" and "ember.train.launch" in info[2]


def worker_rank(pid: int) -> int | None:
    """The RANK torchrun gave a worker (from its environment), or None if it is gone."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


@dataclass
class Job:
    """An `ember train` subprocess; its output is collected as it comes (a full pipe never stalls it)."""

    proc: subprocess.Popen
    output: list[str] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # every worker pid observed, to clean up after

    def workers(self) -> list[int]:
        found = job_workers(self.proc.pid)
        self.seen.update(found)
        return found

    def running(self, ready, what: str, workers: int = 2) -> list[int]:
        """Wait until `ready()` while the job still runs; returns its workers' pids, once all have started."""
        from tests.waiting import wait_until

        wait_until(lambda: self.proc.poll() is not None or ready(), timeout=300, what=what)
        assert self.proc.poll() is None, self.text[-3000:]
        return wait_until(lambda: len(self.workers()) == workers and self.workers(), what="the job's workers")

    @property
    def text(self) -> str:
        return "".join(self.output)


@contextlib.contextmanager
def train_job(config: Path, *options: str):
    """`ember train OPTIONS CONFIG` as a subprocess; on leaving, nothing it started is left running
    (the launcher, and the workers seen, by pid: never anything else on the machine)."""
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "train", *options, str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = Job(proc)
    reader = threading.Thread(target=lambda: job.output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        yield job
    finally:
        stray = job.seen | set(job_workers(proc.pid))
        if proc.poll() is None:
            proc.kill()
        for pid in stray:
            if is_worker_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait()
        reader.join(10)


def logged_steps(run_dir: Path) -> int:
    """How many records the run's metrics.jsonl holds so far."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0
