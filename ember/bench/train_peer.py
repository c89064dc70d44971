"""The training peer: a plain-PyTorch FSDP2 script over transformers' model (run by torchrun).

Same model files, batch shape and optimizer as `ember bench train`; prints one JSON line
with the median step time and peak memory of rank 0.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist


def main(model_dir: str, steps: int, micro_batch: int, seq_len: int, reshard: bool) -> None:
    import transformers
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    times = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step * world + rank)
        ids = torch.randint(100, min(vocab, 30000), (micro_batch, seq_len + 1), generator=g)
        t0 = time.perf_counter()
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"step_s": statistics.median(times[1:]), "peak_bytes":
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")
