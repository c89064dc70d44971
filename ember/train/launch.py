"""Launching: one process in place, or N processes per node through torchrun.

`python -m ember.train.launch CONFIG` is what each torchrun worker runs.
"""

from __future__ import annotations

import sys
import uuid

from ember.train.config import TrainConfig


def launch(config_path: str, nproc: int = 1, nnodes: int = 1, node_rank: int | None = None,
           rdzv_endpoint: str | None = None, rdzv_id: str | None = None, max_restarts: int = 0) -> int:
    """Validate everything first, then train; returns the exit status. With `max_restarts` K, torchrun
    restarts the whole group up to K times after a worker dies, and it resumes from the latest checkpoint."""
    from ember.train.faults import run_torchrun
    from ember.train.trainer import preflight, run
    from ember.train.zero import training_device

    if nproc < 1 or nnodes < 1:
        raise ValueError(f"--nproc/--nnodes: {nproc}/{nnodes} must be >= 1")
    if max_restarts < 0:
        raise ValueError(f"--max-restarts: {max_restarts} must be >= 0")
    config = TrainConfig.load(config_path)
    preflight(config, nproc * nnodes)
    # Too few GPUs for device: cuda fails here, not in every worker; a CPU run hides the GPUs from its
    # workers, or torch's defaults (FSDP meshes, collectives' object transport) would still reach for them.
    cpu_run = training_device(config.device, nproc) == "cpu"
    if nproc == 1 and nnodes == 1:
        run(config)
        return 0
    args = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes)]
    if nnodes == 1 and rdzv_endpoint is None:
        args.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("--rdzv-endpoint: required with --nnodes > 1 (HOST:PORT of the rendezvous)")
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id or uuid.uuid4().hex[:8]]
        if node_rank is not None:
            args += ["--node-rank", str(node_rank)]
    args += ["-m", "ember.train.launch", config_path]
    failure = run_torchrun(args, "training", max_restarts, {"CUDA_VISIBLE_DEVICES": ""} if cpu_run else None)
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # a torchrun worker: a process of its own, so it sets up logging as the CLI does
    from ember.train.faults import die_with_parent

    die_with_parent()  # first: a worker never outlives `ember train`, even a SIGKILLed one
    from ember.logs import configure_logging
    from ember.train.trainer import run
    from ember.train.zero import run_worker

    configure_logging()
    run_worker(run, TrainConfig.load(sys.argv[1]))
