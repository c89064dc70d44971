"""`ember bench limits`: the floor's arithmetic against a hand count, and the machine measurement's shape."""

import dataclasses
import math

import pytest

from ember.bench.limits import MachineLimits, floor, measure_machine
from ember.bench.workloads import Workload
from ember.models.config import Family, LayerSpec, ModelConfig

CONFIG = ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=100, hidden_size=16,
                     intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
LIMITS = MachineLimits(product_flops=1e6, read_bytes=1e5, threads=1)


def test_floor_counts_products_weights_and_keys_by_hand():
    workload = Workload("t", [[1, 2, 3], [4, 5, 6, 7, 8]], 4)
    result = floor(CONFIG, workload, LIMITS)

    # per layer: qkv 16 x (4 + 2 + 2) * 4 = 512, o 16 x 16 = 256, gate_up 64 x 16 = 1024, down 16 x 32 = 512
    layer, head = 2304, 1600
    weight_bytes = 2 * (2 * layer + head)
    prompt_flops = 2 * 8 * 2 * layer + 2 * 2 * head + 2 * 2 * 4 * 4 * (6 + 15)  # 3 and 5 tokens: 6 and 15 pairs
    assert result.prefill_s == pytest.approx(max(prompt_flops / 1e6, weight_bytes / 1e5))
    step = max(2 * 2 * (2 * layer + head) / 1e6, weight_bytes / 1e5)
    assert result.decode_products_s == pytest.approx(3 * step)  # 4 tokens: the first comes with the prompt
    keys = (4 + 5 + 6) + (6 + 7 + 8)  # the two rows' keys at decode steps 1-3
    assert result.decode_attention_s == pytest.approx(2 * keys * 2 * 4 * 2 * 2 / 1e5)  # 2 layers, K and V, bf16
    assert result.output_tokens == 8
    assert result.seconds == pytest.approx(result.prefill_s + result.decode_products_s + result.decode_attention_s)


def test_a_sliding_window_caps_the_keys_a_row_reads():
    windowed = dataclasses.replace(CONFIG, layers=(LayerSpec(sliding_window=4), LayerSpec()))
    workload = Workload("t", [[1] * 6], 3)
    limits = MachineLimits(product_flops=1e6, read_bytes=1e12, threads=1)  # prompts bound by their products
    full, capped = floor(CONFIG, workload, limits), floor(windowed, workload, limits)
    # steps 1-2 see 7 and 8 keys; the windowed layer reads 4 each time
    assert capped.decode_attention_s == pytest.approx(full.decode_attention_s * (15 + 8) / 30)
    # the windowed layer's prompt pairs: 10 + 2 * 4 = 18 instead of 21, each 2 products of 4 heads x 4 dims
    assert full.prefill_s - capped.prefill_s == pytest.approx(3 * 2 * 2 * 4 * 4 / 1e6)


def test_mixture_of_experts_is_refused():
    moe = dataclasses.replace(CONFIG, family=Family(moe="mixtral"))
    with pytest.raises(ValueError, match="mixture of experts"):
        floor(moe, Workload("t", [[1, 2]], 2), LIMITS)


def test_measure_machine_reports_rates_on_a_small_model():
    limits = measure_machine(CONFIG, rows=64, rounds=1, min_seconds=0.0, read_bytes=16 << 20)
    assert math.isfinite(limits.product_flops) and limits.product_flops > 1e6
    assert math.isfinite(limits.read_bytes) and limits.read_bytes > 1e8
    assert limits.threads >= 1
