"""Probe for test_tensor_parallel: the peak anonymous memory (RssAnon, sampled every 2 ms) a rank of a
TP=2 split takes to load a model, whole-then-split or piece by piece. Run as
`python -m tests.engine.tp_load_memory whole|shard MODEL_DIR`; prints `peak_bytes weight_bytes`."""

from __future__ import annotations

import sys
import threading

import torch


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(mode: str, path: str) -> None:
    from ember.models.loader import load_model
    from ember.models.quant import weight_bytes
    from ember.models.tensor_parallel import TensorParallelGroup, load_model_shard, shard_model

    base = rss_anon()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    tp = TensorParallelGroup(0, 2)  # loading runs no collective: no process group needed
    if mode == "whole":
        model, _ = load_model(path, "float32", "cpu")
        shard_model(model, tp)
    else:
        model, _ = load_model_shard(path, "float32", torch.device("cpu"), tp)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_anon())
    print(peak[0] - base, weight_bytes(model))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
