"""The benchmark workloads (W1-W5, BENCHMARKS.md) as token-id prompts (numpy default_rng, as specified)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: int

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def w1(num_requests: int = 64, output_len: int = 128) -> Workload:
    """Offline throughput: lengths uniform on [64, 512], ids uniform on [100, 30000)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(64, 513, size=num_requests)
    prompts = [rng.integers(100, 30000, size=int(n)).tolist() for n in lengths]
    return Workload("W1", prompts, output_len)


def w2(prompt_len: int = 128, output_len: int = 256) -> Workload:
    """Single-stream latency."""
    rng = np.random.default_rng(1)
    return Workload("W2", [rng.integers(100, 30000, size=prompt_len).tolist()], output_len)


def w3(num_requests: int = 64, prefix_len: int = 1024, suffix_len: int = 64, output_len: int = 64) -> Workload:
    """Shared prefix."""
    prefix = np.random.default_rng(2).integers(100, 30000, size=prefix_len).tolist()
    rng = np.random.default_rng(3)
    prompts = [prefix + rng.integers(100, 30000, size=suffix_len).tolist() for _ in range(num_requests)]
    return Workload("W3", prompts, output_len)


def w2_repetitive(prompt_len: int = 128, output_len: int = 256, passage_len: int = 48) -> Workload:
    """W2's shape, but the prompt holds a passage written three times, so a model that has
    learned to continue a repetition (greedy on a random model does, once it loops) quotes it."""
    rng = np.random.default_rng(1)
    passage = rng.integers(100, 30000, size=passage_len).tolist()
    prompt = (passage * (prompt_len // passage_len + 1))[:prompt_len]
    return Workload("W2-repetitive", [prompt], output_len)
