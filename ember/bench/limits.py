"""`ember bench limits`: the least time this machine allows W1 and W2 on a model, and how close ember gets.

A floor, not a model of ember: every product at the best bf16 rate ember's product path reaches on the
model's own shapes (its pair-packed kernel where the CPU has AVX512-BF16: close to the vdpbf16ps peak),
every byte that must be read (the weights once per decode step, each row's K/V once per step) at the
machine's sequential read rate, a decode step taking the larger of the two, the rest (norms, sampling,
the engine) free. No engine doing the same arithmetic on the same bytes beats it on this machine, so a
speed bar above `floor / peer time` cannot be met here without changing what is computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ember.bench.kernels import model_shapes
from ember.bench.workloads import Workload


@dataclass(frozen=True)
class MachineLimits:
    product_flops: float  # FLOP/s: the best of ember's bf16 products on the model's shapes
    read_bytes: float  # bytes/s: a sequential read of 1 GiB
    threads: int


@dataclass(frozen=True)
class Floor:
    prefill_s: float  # prompt products and prompt attention, at the product rate
    decode_products_s: float  # per step the larger of its products' time and its weights' read time
    decode_attention_s: float  # each row's K/V read once per step
    output_tokens: int

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_products_s + self.decode_attention_s


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def product_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of a decoder layer's products (qkv, o, gate_up, down) and of the LM head."""
    return [(n, k) for _, n, k in model_shapes(config)]


def measure_machine(config, rows: int = 1024, rounds: int = 5, min_seconds: float = 5.0,
                    read_bytes: int = 1 << 30) -> MachineLimits:
    """The best bf16 product rate over the model's shapes at `rows` rows, and the sequential read rate.

    Each the fastest of several rounds spread over at least `min_seconds`: a limit is what the machine
    does undisturbed, and this host's neighbours slow everything by up to 2x for seconds at a time."""
    from ember.models import cpu_ops

    torch.manual_seed(0)
    calls = []
    for n, k in product_shapes(config):
        weight, x = (torch.randn(n, k) * 0.02).bfloat16(), torch.randn(rows, k).bfloat16()
        for invariant in (True, False):  # the engine's two routings (pair-packed kernel, oneDNN)
            calls.append((2 * rows * n * k, invariant, lambda x=x, weight=weight: cpu_ops.linear(x, weight, None)))
    data = torch.ones(read_bytes // 4)  # fp32; the default 1 GiB is far beyond any cache
    fastest = [float("inf")] * (len(calls) + 1)
    started = time.perf_counter()
    with torch.inference_mode():
        for _, invariant, call in calls:  # packs each weight for its path
            with cpu_ops.batch_invariance(invariant):
                call()
        for round_ in range(1, 10 * rounds + 1):
            for i, (_, invariant, call) in enumerate(calls):
                with cpu_ops.batch_invariance(invariant):
                    fastest[i] = min(fastest[i], _seconds(call))
            fastest[-1] = min(fastest[-1], _seconds(data.sum))
            if round_ >= rounds and time.perf_counter() - started >= min_seconds:
                break
    best = max(flops / seconds for (flops, _, _), seconds in zip(calls, fastest))
    return MachineLimits(best, data.numel() * data.element_size() / fastest[-1], torch.get_num_threads())


def _causal_pairs(n: int, window: int | None) -> int:
    """(query, key) pairs of an n-token causal prompt: query i sees min(i, window) keys."""
    if window is None or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def floor(config, workload: Workload, limits: MachineLimits) -> Floor:
    """The floor of `workload` (all requests at once, each `max_tokens` greedy tokens, as W1/W2 run)."""
    if config.family.moe:
        raise ValueError("ember bench limits: a dense decoder is expected (a mixture of experts reads only "
                         "the experts its tokens pick, which this floor does not model)")
    h, d, layers = config.hidden_size, config.head_dim, config.num_layers
    layer_params = sum(n * k for n, k in product_shapes(config)[:4])
    head_params = config.vocab_size * h
    weight_bytes = 2 * (layers * layer_params + head_params)  # bf16
    kv_bytes_per_token = config.num_kv_heads * d * 2 * 2  # one layer's K and V, bf16
    lengths = [len(p) for p in workload.prompts]
    rows = len(lengths)

    prompt_flops = 2 * sum(lengths) * layers * layer_params + 2 * rows * head_params  # LM head: last token only
    windows = [spec.sliding_window for spec in config.layers]
    # causal q.k and p.v of each prompt: the (query, key) pairs per head, 2 products of head_dim each
    prompt_flops += sum(2 * 2 * config.num_heads * d * _causal_pairs(n, window) for window in windows for n in lengths)
    prefill = max(prompt_flops / limits.product_flops, weight_bytes / limits.read_bytes)

    steps = workload.max_tokens - 1  # the prefill step samples each request's first token
    step_products = max(2 * rows * (layers * layer_params + head_params) / limits.product_flops,
                        weight_bytes / limits.read_bytes)
    keys_read = sum(min(n + t, window or n + t)  # row i sees n_i + t keys at step t (or its layer's window)
                    for window in windows for t in range(1, steps + 1) for n in lengths)
    return Floor(prefill, steps * step_products, keys_read * kv_bytes_per_token / limits.read_bytes,
                 rows * workload.max_tokens)
