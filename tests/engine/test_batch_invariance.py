"""Batch-invariant bf16 (the engine's default): a request's tokens and logprobs are the same bits alone,
inside batches of any size and mix, after a prefix-cache hit, and under speculative decoding."""

import random

import pytest
import torch

from ember import LLM, SamplingParams
from ember.models import cpu_ops
from tests.conftest import VOCAB


@pytest.fixture
def invariant_products():
    cpu_ops.set_batch_invariant(True)
    yield
    cpu_ops.set_batch_invariant(False)


@pytest.mark.parametrize("shape", [(384, 384), (1152, 384), (8192, 384), (96, 200), (64, 129)])
def test_bf16_product_rows_do_not_depend_on_the_row_count(shape, invariant_products):
    """Whatever kernel this CPU gets (pair-packed, GEMV, oneDNN), one row's bits never change with the rows beside it."""
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    weight = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    bias = (torch.randn(n, generator=g) * 0.1).bfloat16()
    x = torch.randn(2500, k, generator=g).bfloat16()
    with torch.inference_mode():
        alone = torch.cat([cpu_ops.linear(x[i:i + 1], weight, bias) for i in (0, 1, 2, 5, 2499)])
        for rows in (2, 3, 7, 64, 600, 2500):
            out = cpu_ops.linear(x[:rows], weight, bias)
            picked = [i for i in (0, 1, 2, 5, 2499) if i < rows]
            assert torch.equal(out[picked], alone[:len(picked)]), f"{shape}, {rows} rows"


needs_int_kernels = pytest.mark.skipif(not cpu_ops.int_kernels_available(),
                                       reason="quantized invariance needs ember's integer kernels (AVX512-VNNI)")
needs_pair_kernel = pytest.mark.skipif(not cpu_ops.gemv_available(),
                                       reason="LoRA invariance needs ember's pair-packed kernel (AVX512-BF16)")


@needs_int_kernels
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_product_rows_do_not_depend_on_the_row_count(method, invariant_products):
    """int8/int4 weights: a row's bits are the same alone and among hundreds (no switch to dequantize +
    matmul for big batches, which sums differently)."""
    from ember.models.quant import QuantConfig, QuantizedLinear

    g = torch.Generator().manual_seed(7)
    linear = torch.nn.Linear(256, 384, bias=True).bfloat16()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(384, 256, generator=g) * 0.05)
    layer = QuantizedLinear.quantize(linear, QuantConfig(method, group_size=64))
    x = torch.randn(300, 256, generator=g).bfloat16()
    with torch.inference_mode():
        alone = torch.cat([layer(x[i:i + 1]) for i in (0, 3, 299)])
        rows = layer.rows_function()
        for count in (2, 17, 64, 300):
            picked = [i for i in (0, 3, 299) if i < count]
            for forward in (layer, rows):
                assert torch.equal(forward(x[:count])[picked], alone[:len(picked)]), f"{method}, {count} rows"


def _greedy(max_tokens, logprobs=3):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)


def _result(output):
    o = output.outputs[0]
    return o.token_ids, [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in o.logprobs]


@pytest.fixture(scope="module")
def bf16_model(model_factory):
    return str(model_factory("llama", std=0.1))


@pytest.mark.parametrize("backend", ["cpu_paged", "torch_paged"])
def test_a_request_is_the_same_bits_alone_and_in_any_batch(bf16_model, backend):
    rng = random.Random(1)
    target = [rng.randrange(VOCAB) for _ in range(45)]
    others = [[rng.randrange(VOCAB) for _ in range(rng.randrange(2, 150))] for _ in range(63)]
    lengths = [rng.randrange(1, 40) for _ in range(63)]
    kwargs = dict(dtype="bfloat16", attention_backend=backend, max_num_batched_tokens=256)

    # alone, on a fresh engine (no cached prefix)
    alone = _result(LLM(bf16_model, **kwargs).generate([target], _greedy(24), use_tqdm=False)[0])

    llm = LLM(bf16_model, **kwargs)
    for size in (2, 7, 64):
        # the others arrive first so the target's prompt shares steps with prompt chunks and decodes;
        # from the second batch on its prompt is also a prefix-cache hit
        batch = others[:size - 1] + [target]
        params = [_greedy(m, logprobs=None) for m in lengths[:size - 1]] + [_greedy(24)]
        got = llm.generate(batch, params, use_tqdm=False)[-1]
        assert _result(got) == alone, f"batch of {size} ({backend})"


@needs_int_kernels
def test_a_quantized_request_is_the_same_bits_alone_and_in_a_batch(bf16_model):
    """int4 (the case that changed most: 22 of 24 greedy tokens when steps of over 16 rows dequantized)."""
    rng = random.Random(4)
    target = [rng.randrange(VOCAB) for _ in range(30)]
    others = [[rng.randrange(VOCAB) for _ in range(rng.randrange(20, 80))] for _ in range(7)]
    kwargs = dict(dtype="bfloat16", quantization="int4", max_num_batched_tokens=64)
    llm = LLM(bf16_model, **kwargs)
    alone = _result(llm.generate([target], _greedy(16), use_tqdm=False)[0])
    # the target first (its prompt now a prefix-cache hit): its decodes share steps with the others' prompt chunks
    params = [_greedy(16)] + [_greedy(2, logprobs=None) for _ in others]
    got = llm.generate([target] + others, params, use_tqdm=False)[0]
    assert _result(got) == alone


@needs_pair_kernel
@pytest.mark.parametrize("max_rank", [7, 16])
def test_invariant_lora_slots_compute_the_adapters_product(invariant_products, max_rank):
    """The pair-packed LoRA path against x A^T B^T in float64: a merged projection (three shards, two of
    them adapted), an adapter rank below the slot's maximum (odd too), rows as a slice and as an index."""
    from ember.engine.config import LoRAConfig
    from ember.engine.lora import LoRABatch, LoRASlots
    from ember.models.layers import MergedLinear

    g = torch.Generator().manual_seed(3)
    module = MergedLinear(96, [64, 32, 32], ["q_proj", "k_proj", "v_proj"], bias=False)
    batch = LoRABatch()
    slots = LoRASlots(module, LoRAConfig(enable_lora=True, max_loras=2, max_lora_rank=max_rank), batch,
                      torch.bfloat16, torch.device("cpu"))
    rank = 5
    parts = {0: (torch.randn(rank, 96, generator=g), torch.randn(64, rank, generator=g)),
             2: (torch.randn(rank, 96, generator=g), torch.randn(32, rank, generator=g))}
    slots.write(1, parts, rank, scaling=0.5)
    x = torch.randn(40, 96, generator=g).bfloat16()
    want = torch.zeros(40, 128, dtype=torch.float64)
    a, b = slots.a[1].double(), slots.b[1].double()
    for rows in (slice(3, 20), torch.tensor([0, 25, 39])):
        want[rows] = x[rows].double() @ a.t() @ b.t()
    batch.groups = [(1, slice(3, 20)), (1, torch.tensor([0, 25, 39]))]
    with torch.inference_mode():
        got = slots.add(x, torch.zeros(40, 128, dtype=torch.bfloat16)).double()
    assert want.abs().max() > 1  # the adapters do something
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    untouched = [i for i in range(40) if not (3 <= i < 20) and i not in (0, 25, 39)]
    assert not got[untouched].any()


@needs_pair_kernel
def test_a_request_with_an_adapter_is_the_same_bits_alone_and_among_other_adapters(bf16_model, tmp_path):
    """LoRA slots in bf16: the adapter's two products go through the pair-packed kernel (torch's bf16
    matmuls had changed the target's logprobs by up to 2e-2 in batches of 7 and 32)."""
    pytest.importorskip("peft")  # make_adapter writes a PEFT adapter
    from ember.engine.lora import LoRARequest
    from tests.engine.test_lora import make_adapter

    adapters = [LoRARequest(f"a{i}", i + 1, str(make_adapter(bf16_model, tmp_path / f"a{i}", seed=10 + i, r=4 + i)))
                for i in range(3)]
    rng = random.Random(1)
    target = [rng.randrange(VOCAB) for _ in range(45)]
    others = [[rng.randrange(VOCAB) for _ in range(rng.randrange(2, 150))] for _ in range(31)]
    llm = LLM(bf16_model, dtype="bfloat16", enable_lora=True, max_loras=3, max_lora_rank=8, max_num_batched_tokens=256)
    alone = _result(llm.generate([target], _greedy(16), use_tqdm=False, lora_request=adapters[0])[0])
    for size in (7, 32):
        which = [adapters[0]] + [[None, *adapters][i % 4] for i in range(size - 1)]
        params = [_greedy(16)] + [_greedy(8, logprobs=None)] * (size - 1)
        got = llm.generate([target] + others[:size - 1], params, use_tqdm=False, lora_request=which)[0]
        assert _result(got) == alone, f"batch of {size}"


def _repetitive(rng, n):
    prompts = []
    for _ in range(n):
        passage = [rng.randrange(VOCAB) for _ in range(rng.randrange(6, 30))]
        prompts.append(passage * 3 + [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 4))])
    return prompts


def test_speculative_decoding_is_exact_in_bf16(bf16_model):
    prompts = _repetitive(random.Random(2), 6)
    params = _greedy(40)
    plain = [_result(o) for o in LLM(bf16_model, dtype="bfloat16").generate(prompts, params, use_tqdm=False)]
    # the target as its own draft: every draft is accepted only if verifying k+1 rows gives the bits of one
    for spec in ({"method": "ngram", "num_tokens": 5, "max_ngram": 4}, {"method": "draft", "model": bf16_model, "num_tokens": 3}):
        llm = LLM(bf16_model, dtype="bfloat16", speculative=spec)
        got = [_result(o) for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == plain, spec["method"]
        stats = llm.engine.get_stats()
        assert stats["spec_num_accepted"] > 0, spec["method"]
        if spec["method"] == "draft":
            assert stats["spec_num_accepted"] == stats["spec_num_drafts"], stats


def test_default_model_repeats_a_passage_identically_with_ngram_speculation():
    """The issue's case: a 200-token passage repeated, 256 greedy tokens, plain vs n-gram (5 tokens, 4-grams)."""
    rng = random.Random(3)
    passage = [rng.randrange(5, 8000) for _ in range(200)]
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True, logprobs=1)
    plain = _result(LLM().generate([passage * 2], params, use_tqdm=False)[0])
    spec = LLM(speculative={"method": "ngram", "num_tokens": 5, "max_ngram": 4})
    assert _result(spec.generate([passage * 2], params, use_tqdm=False)[0]) == plain
    assert spec.engine.get_stats()["spec_num_accepted"] > 0


def test_invariant_engines_keep_the_paired_layout_only_for_plain_attention():
    """The paired kernel has no soft-capping or sinks (those layers fall back to the PyTorch reference,
    whose bits depend on the batch), so a batch-invariant engine of such a model uses the transposed layout."""
    from ember.engine.attention import choose_layout
    from ember.engine.attention.cpu_paged import bf16_pairs_supported

    paired = bf16_pairs_supported()
    assert choose_layout("cpu_paged", torch.bfloat16, batch_invariant=True, plain_attention=True).paired == paired
    assert not choose_layout("cpu_paged", torch.bfloat16, batch_invariant=True, plain_attention=False).paired
    assert choose_layout("cpu_paged", torch.bfloat16, batch_invariant=False, plain_attention=False).paired == paired
    assert not choose_layout("torch_paged", torch.bfloat16, batch_invariant=True).paired
