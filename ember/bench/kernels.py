"""`ember bench kernels`: the linear-layer kernels behind decoding, on the shapes of a model.

Per weight shape and row count: PyTorch's bf16 F.linear, ember's bf16 GEMV, PyTorch's int8
weight-only kernel (torchao's CPU path), ember's int8 GEMV, PyTorch's int4 kernel, ember's int4
GEMV; each the median of timed repeats, with the weight bytes per second it reaches.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def _time(fn, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def model_shapes(config) -> list[tuple[str, int, int]]:
    h, i = config.hidden_size, config.intermediate_size
    qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    return [("qkv", qkv, h), ("o", h, config.num_heads * config.head_dim), ("gate_up", 2 * i, h),
            ("down", h, i), ("lm_head", config.vocab_size, h)]


def run_kernels(config, rows: list[int], group_size: int) -> None:
    from ember.models import cpu_ops
    from ember.models.quant import QuantConfig, QuantizedLinear

    if not cpu_ops.gemv_available():
        raise ValueError("ember's GEMV kernels are not available on this CPU (AVX512-BF16 and VNNI needed)")
    print("shape | rows | ms: F.linear bf16, ember bf16, torch int8, ember int8, torch int4, ember int4")
    for name, n, k in model_shapes(config):
        linear = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
        int8 = QuantizedLinear.quantize(linear, QuantConfig("int8"))
        int4 = QuantizedLinear.quantize(linear, QuantConfig("int4", group_size))
        q4 = torch.randint(0, 16, (n, k), dtype=torch.int32)
        torch_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
        torch_sz = torch.rand(k // group_size, n, 2, dtype=torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            with torch.inference_mode():
                times = [
                    _time(lambda: F.linear(x, linear.weight)),
                    _time(lambda: cpu_ops.linear(x, linear.weight, None)) if m <= cpu_ops.PAIRS_MAX_ROWS else None,
                    _time(lambda: torch.ops.aten._weight_int8pack_mm(x, int8.qweight, int8.scales)),
                    _time(lambda: int8(x)),
                    _time(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, torch_int4, group_size, torch_sz)),
                    _time(lambda: int4(x)),
                ]
            cells = " | ".join("-" if t is None else f"{t * 1e3:.3f}" for t in times)
            print(f"{name} {n}x{k} | {m} | {cells}", flush=True)
