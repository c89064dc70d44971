"""The DeepSpeed training peer: transformers' model under deepspeed.initialize (ZeRO-2 or -3), run by
torchrun with the peer venv's python (`ember bench train --compare deepspeed --peer-python PATH`).

A script of its own, importing torch, numpy, transformers and deepspeed only (ember is not installed in
the peer's venv). Its one argument is a JSON file written by ember.bench.train_race: the model
directory, the token windows ember trains on (an .npz of inputs and labels [steps, world, micro, T]),
the DeepSpeed config and the optimizer's arguments. Rank 0 prints one JSON line: per-step losses (the
mean over ranks, as ember logs them), per-step seconds, and every rank's peak RSS (VmHWM).

The venv: `python3 -m venv /work/peers/deepspeed && /work/peers/deepspeed/bin/pip install torch==2.13.0
'deepspeed>=0.19,<0.20' transformers safetensors accelerate` (accelerate: transformers' zero.Init loading
for ZeRO-3). On CPU DeepSpeed picks its CPU accelerator (DS_ACCELERATOR=cpu) and, without oneCCL, gloo.
"""

from __future__ import annotations

import json
import os
import sys
import time


def reset_peak() -> None:
    """A new VmHWM from here (as ember's trainer resets it before building the model)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def param_groups(model, weight_decay: float) -> list[dict]:
    """ember's groups (ember.train.zero.param_groups): matrices decayed, norms and biases not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build(spec: dict):
    import deepspeed
    import torch
    import transformers

    ds_config = spec["ds_config"]
    keep = None
    if ds_config["zero_optimization"]["stage"] == 3:
        # DeepSpeed's own ZeRO-3 start: from_pretrained under zero.Init, so no rank holds the whole model.
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # transformers reads it while it lives
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.train()
    opt = spec["optimizer"]
    optimizer = torch.optim.AdamW(param_groups(model, opt["weight_decay"]), lr=opt["lr"], betas=tuple(opt["betas"]),
                                  eps=opt["eps"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    del keep
    return engine


def main(spec_path: str) -> None:
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist

    with open(spec_path) as f:
        spec = json.load(f)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reset_peak()
    engine = build(spec)
    data = np.load(spec["data"])
    inputs, labels = torch.from_numpy(data["inputs"]), torch.from_numpy(data["labels"])
    losses, times = [], []
    for step in range(inputs.shape[0]):
        t0 = time.perf_counter()
        logits = engine(inputs[step, rank]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[step, rank].flatten(),
                                                 ignore_index=-100)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)  # the mean over ranks, as ember's metrics.jsonl has it
        losses.append(total.item() / world)
        times.append(time.perf_counter() - t0)
    peaks: list = [None] * world
    dist.all_gather_object(peaks, peak_rss_bytes())
    if rank == 0:
        print(json.dumps({"losses": losses, "step_s": times, "rank_peak_bytes": peaks,
                          "threads": torch.get_num_threads(), "deepspeed": deepspeed.__version__}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
