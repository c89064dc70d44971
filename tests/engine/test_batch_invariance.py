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
