"""Runs that survive a dead rank (torchrun restarts, resume from the latest checkpoint), workers that die
with their launcher, failures named by their cause, keep_last, the run summary, a full disk, TensorBoard."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import time

import pytest
import torch.distributed as dist

from ember.train.checkpoint import prune_checkpoints
from ember.train.config import ConfigError, TrainConfig
from ember.train.faults import describe_failure, disk_full
from tests.train.conftest import (
    is_worker_alive,
    logged_steps,
    losses,
    train,
    train_job,
    worker_rank,
    write_config,
)
from tests.waiting import wait_until


@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_the_run_matches_an_uninterrupted_one(train_assets, tmp_path):
    # enough steps that the kill, right after the first checkpoint (step 4), always lands mid-run
    settings = {"max_steps": 120, "save_interval": 4, "eval_interval": 60, "keep_last": 2}
    uninterrupted = train(write_config(tmp_path / "reference", train_assets, **settings), nproc=2)
    reference, reference_eval = losses(uninterrupted), uninterrupted[-1]["eval_loss"]
    path = write_config(tmp_path / "killed", train_assets, **settings)
    latest = tmp_path / "killed" / "run" / "checkpoints" / "latest"
    with train_job(path, "--nproc", "2", "--max-restarts", "1") as job:
        workers = job.running(latest.is_file, "a checkpoint")
        victim = next(pid for pid in workers if worker_rank(pid) == 1)
        os.kill(victim, signal.SIGKILL)
        assert job.proc.wait(timeout=600) == 0, job.text[-3000:]
    resumed = [line for line in job.text.splitlines() if "restart 1: resuming from" in line]
    assert resumed and "checkpoints/step-" in resumed[0], job.text[-3000:]
    run_dir = tmp_path / "killed" / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 121))  # each step once, whatever was redone
    for step, loss in losses(records).items():
        assert abs(loss - reference[step]) <= 1e-5, (step, loss, reference[step])
    assert abs(records[-1]["eval_loss"] - reference_eval) <= 1e-5
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["final", "latest", "step-112", "step-116"]


def test_killing_the_launcher_kills_its_workers(train_assets, tmp_path):
    path = write_config(tmp_path, train_assets, max_steps=100000)
    with train_job(path, "--nproc", "2") as job:
        workers = job.running(lambda: logged_steps(tmp_path / "run") >= 2, "2 training steps")
        os.kill(job.proc.pid, signal.SIGKILL)  # as the OOM killer or a scheduler would: no chance to clean up
        job.proc.wait(timeout=60)
        wait_until(lambda: not any(is_worker_alive(pid) for pid in workers), timeout=120,
                   what="the orphaned workers to die")


def test_a_worker_failure_names_its_cause(train_assets, tmp_path):
    # Passes the launcher's checks (the file exists) but is too short to train on: rank 0 raises while
    # building the data, rank 1 then fails in a collective; the line names rank 0's error.
    (tmp_path / "short.txt").write_text("hello there")
    path = write_config(tmp_path, train_assets, data={"train": [str(tmp_path / "short.txt")]})
    with train_job(path, "--nproc", "2") as job:
        assert job.proc.wait(timeout=300) == 1
    wait_until(lambda: "error: training failed" in job.text, timeout=10, what="the error line")
    line = next(line for line in job.text.splitlines() if line.startswith("error: "))
    assert line.startswith("error: training failed on rank 0 (exit 1): ConfigError: data.train: "), line
    assert "do not make one sequence of seq_len 32" in line, line


def _failure(tmp_path, rank: int, exitcode: int, message: str | None = None, when: float = 0.0):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / f"error-{rank}-{exitcode}.json"
    if message is not None:  # as faults.record_error writes it
        error_file.write_text(json.dumps({"message": {"message": message, "extraInfo": {
            "py_callstack": "", "timestamp": str(int(when)), "time": when}}}))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_the_root_cause_is_the_first_failure_not_its_consequences(tmp_path):
    now = time.time()
    peer_lost = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:1234"
    failures = {0: _failure(tmp_path, 0, 1, peer_lost, now + 0.2), 1: _failure(tmp_path, 1, 1, "ValueError: bad\nmore", now),
                2: _failure(tmp_path, 2, -signal.SIGTERM)}
    assert describe_failure(failures) == "training failed on rank 1 (exit 1): ValueError: bad"
    # a rank killed from outside (kill -9, the OOM killer) caused its peers' errors, whatever the clock says
    failures = {0: _failure(tmp_path, 0, 1, peer_lost, now - 5), 1: _failure(tmp_path, 1, -signal.SIGKILL)}
    assert describe_failure(failures) == "training failed: rank 1 was killed by SIGKILL"
    assert describe_failure({3: _failure(tmp_path, 3, 7)}, "grpo") == \
        "grpo failed on rank 3 (exit 7) (no error recorded; see its output above)"


def test_disk_full_is_recognised(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    try:  # torch's serializer wraps it: `unexpected pos`, the OSError only in the chain (when at all)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("unexpected pos 704 vs 598") from e
    except RuntimeError as e:
        assert disk_full(e, tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 4096))
    assert disk_full(RuntimeError("unexpected pos 704 vs 598"), tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 1 << 30, 9 << 30))
    assert not disk_full(RuntimeError("unexpected pos 704 vs 598"), tmp_path)


def test_a_full_disk_while_saving_leaves_the_last_checkpoint_alone(train_assets, tmp_path, monkeypatch):
    import ember.train.trainer as trainer_module
    from ember.train.trainer import run

    real_save, calls = trainer_module.save_checkpoint, []

    def save_then_fill_the_disk(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            (path / "dcp").mkdir(parents=True, exist_ok=True)
            (path / "dcp" / "__0_0.distcp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_fill_the_disk)
    config = TrainConfig.load(write_config(tmp_path, train_assets, max_steps=6, save_interval=2))
    with pytest.raises(OSError, match=r"No space left on device: saving checkpoint step-4 in .*checkpoints") as error:
        run(config)
    assert error.value.errno == errno.ENOSPC
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step-2" and (root / "step-2" / "trainer_state.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2"]  # no .pending-step-4


def test_keep_last_and_the_run_summary(train_assets, tmp_path, caplog):
    from ember.train.trainer import run

    config = TrainConfig.load(write_config(tmp_path, train_assets, max_steps=6, save_interval=1, keep_last=2))
    with caplog.at_level(logging.INFO, logger="ember"):
        last = run(config)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["final", "latest", "step-4", "step-5"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == summary["steps_this_run"] == 6
    assert summary["tokens"] == 6 * 8 * 32 and summary["trained_tokens"] == summary["tokens"]
    assert summary["loss"] == last["loss"] and summary["eval_loss"] == last["eval_loss"]
    assert summary["checkpoint"] == str(root / "final") and summary["peak_bytes"] > 0
    assert summary["wall_s"] >= summary["train_s"] > 0 and summary["tokens_per_s"] > 0
    assert summary["tflops_per_s"] > 0 and "mfu" not in summary  # a CPU has no known peak
    assert any(r.getMessage().startswith("run summary: 6 steps") for r in caplog.records)


def test_prune_keeps_the_newest_and_what_latest_names(tmp_path):
    for name in ("step-1", "step-2", "step-3", "step-10", "step-20", "final"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("step-2")  # e.g. a resume from an older checkpoint
    deleted = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["step-1", "step-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "latest", "step-10", "step-2", "step-20"]


def test_eval_loss_does_not_depend_on_the_micro_batch(train_assets, tmp_path):
    from ember.train.trainer import Trainer

    results = {}
    for micro_batch in (3, 4, 5):  # 12 held-out sequences: 5 leaves a partial batch
        path = write_config(tmp_path / str(micro_batch), train_assets, micro_batch_size=micro_batch,
                            global_batch_size=None, grad_accum=1)
        trainer = Trainer(TrainConfig.load(path))
        try:
            trainer._setup()
            assert len(trainer.eval_data) == 12
            results[micro_batch] = trainer.evaluate()
        finally:
            dist.destroy_process_group()
    assert max(results.values()) - min(results.values()) <= 1e-6, results


def test_tensorboard(train_assets, tmp_path, monkeypatch):
    import importlib.util

    from ember.train.trainer import preflight, run

    config = TrainConfig.load(write_config(tmp_path, train_assets, max_steps=3, eval_interval=2, tensorboard=True))
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            preflight(config, 1)
        pytest.skip("tensorboard is not installed (pip install 'ember[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(config)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {f"train/{k}" for k in ("loss", "lr", "grad_norm", "eval_loss", "tokens_per_s")} <= set(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"tensorboard: true needs .*pip install tensorboard"):
        preflight(config, 1)


def test_max_restarts_must_not_be_negative(train_assets, tmp_path):
    from ember.train.launch import launch

    with pytest.raises(ValueError, match="--max-restarts: -1 must be >= 0"):
        launch(str(write_config(tmp_path, train_assets)), nproc=2, max_restarts=-1)


def test_mfu_needs_a_known_peak():
    from ember.train.runlog import peak_flops, summary_line

    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None and peak_flops("Some GPU", "bf16") is None
    summary = {"steps": 10, "steps_this_run": 4, "tokens": 40960, "trained_tokens": 40000, "wall_s": 12.0,
               "train_s": 10.0, "tokens_per_s": 4096.0, "loss": 2.5, "eval_loss": None, "peak_bytes": 2**30,
               "checkpoint": "runs/x/checkpoints/final", "tflops_per_s": 123.0, "mfu": 0.4}
    assert summary_line(summary) == (
        "run summary: 10 steps (4 this run), 40,960 tokens (40,000 trained) in 12.0 s wall, 4,096 tokens/s; "
        "loss 2.5000, eval_loss n/a; peak memory 1.00 GiB per rank; 123 TFLOP/s achieved, MFU 40.0%; "
        "checkpoint runs/x/checkpoints/final")
