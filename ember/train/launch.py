"""Launching: one process in place, or N processes per node through torchrun.

`python -m ember.train.launch CONFIG` is what each torchrun worker runs.
"""

from __future__ import annotations

import os
import sys
import uuid

from ember.train.config import TrainConfig


def launch(config_path: str, nproc: int = 1, nnodes: int = 1, node_rank: int | None = None,
           rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> int:
    """Validate everything first, then train; returns the exit status."""
    from ember.train.trainer import preflight, run
    from ember.train.zero import training_device

    if nproc < 1 or nnodes < 1:
        raise ValueError(f"--nproc/--nnodes: {nproc}/{nnodes} must be >= 1")
    config = TrainConfig.load(config_path)
    preflight(config, nproc * nnodes)
    # Too few GPUs for device: cuda fails here, not in every worker; a CPU run hides the GPUs from its
    # workers, or torch's defaults (FSDP meshes, collectives' object transport) would still reach for them.
    cpu_run = training_device(config.device, nproc) == "cpu"
    if nproc == 1 and nnodes == 1:
        run(config)
        return 0
    from torch.distributed import run as torchrun

    args = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--max-restarts", "0"]
    if nnodes == 1 and rdzv_endpoint is None:
        args.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("--rdzv-endpoint: required with --nnodes > 1 (HOST:PORT of the rendezvous)")
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id or uuid.uuid4().hex[:8]]
        if node_rank is not None:
            args += ["--node-rank", str(node_rank)]
    args += ["-m", "ember.train.launch", config_path]
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cpu_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the workers inherit it at spawn
    try:
        torchrun.main(args)
    except Exception as e:  # a worker failed: torchrun has already stopped the others
        print(f"error: training failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return 0


if __name__ == "__main__":  # a torchrun worker: a process of its own, so it sets up logging as the CLI does
    from ember.logs import configure_logging
    from ember.train.trainer import run
    from ember.train.zero import run_worker

    configure_logging()
    run_worker(run, TrainConfig.load(sys.argv[1]))
