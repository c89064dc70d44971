"""Speculative decoding: exact greedy outputs, the target's distribution when sampling, clean KV."""

import random

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.request import Request
from ember.engine.spec import ngram_propose, verify
from tests.conftest import VOCAB
from tests.engine.test_sampling import chi_square_ok


def test_ngram_lookup():
    assert ngram_propose([1, 2, 3, 4, 1, 2], 2, 3, 1) == [3, 4]
    assert ngram_propose([5, 1, 2, 9, 9, 1, 2], 3, 2, 1) == [9, 9, 1]
    assert ngram_propose([1, 2, 3], 2, 3, 1) == []
    # the latest occurrence wins
    assert ngram_propose([7, 1, 8, 7, 1, 9, 7], 1, 1, 1) == [1]
    # a loop keeps looping: the continuation wraps with the period of the match
    assert ngram_propose([4, 5, 6, 5, 6, 5, 6], 5, 2, 1) == [5, 6, 5, 6, 5]


def repetitive_prompts(n, seed):
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        passage = [rng.randrange(VOCAB) for _ in range(rng.randrange(4, 30))]
        prompts.append(passage * rng.randrange(2, 4) + [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 5))])
    return prompts


@pytest.fixture(scope="module")
def spec_model(model_factory):
    return str(model_factory("llama", std=0.1))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_ngram_is_exact(spec_model, k):
    prompts = repetitive_prompts(12, seed=k)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (7, 40, 64) * 4]
    plain = LLM(spec_model, dtype="float32").generate(prompts, params, use_tqdm=False)
    llm = LLM(spec_model, dtype="float32", speculative={"method": "ngram", "num_tokens": k, "max_ngram": 3})
    spec = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    stats = llm.engine.get_stats()
    assert stats["spec_num_drafts"] > 0 and stats["spec_num_accepted"] > 0
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_greedy_draft_model_is_exact_with_stops_and_small_cache(spec_model, model_factory):
    draft = str(model_factory("llama", std=0.1, seed=1, num_hidden_layers=1))
    prompts = repetitive_prompts(10, seed=7)
    base = LLM(spec_model, dtype="float32")
    free = base.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    stop_text = free[0].outputs[0].text[8:11]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop_text] if stop_text else None)] * 10
    plain = base.generate(prompts, params, use_tqdm=False)
    for k in (1, 3):
        block_bytes = 2 * 2 * 16 * 2 * 16 * 4
        llm = LLM(spec_model, dtype="float32", kv_cache_gib=40 * block_bytes / 2**30, max_num_batched_tokens=128,
                  speculative={"method": "draft", "model": draft, "num_tokens": k})
        spec = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
        assert [o.outputs[0].text for o in spec] == [o.outputs[0].text for o in plain]
        stats = llm.engine.get_stats()
        assert stats["spec_num_drafts"] > 0 and stats["num_free_blocks"] == stats["num_blocks"]


def test_stop_string_inside_an_accepted_run(spec_model):
    prompt = repetitive_prompts(1, seed=3)[0]
    base = LLM(spec_model, dtype="float32")
    free = base.generate([prompt], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    if len(text) < 20:
        pytest.skip("the random model writes too little text here")
    stop = text[12:15]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop=[stop])
    expected = base.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    llm = LLM(spec_model, dtype="float32", speculative={"method": "ngram", "num_tokens": 5})
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids, "stop")


@pytest.mark.parametrize("draft_q", [False, True])
@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(top_p=0.8)])
def test_speculative_sampling_keeps_the_target_distribution(kwargs, draft_q):
    """verify() alone, many draws on a 6-token vocabulary: the first emitted token ~ target."""
    torch.manual_seed(0)
    logits = torch.tensor([[1.5, 1.0, 0.5, 0.0, -0.5, -1.0]] * 3)
    params = SamplingParams(**kwargs)
    request = Request("r", [1], params, max_tokens=10)
    q = torch.tensor([[0.1, 0.5, 0.1, 0.1, 0.1, 0.1]] * 2) if draft_q else None
    gen = torch.Generator().manual_seed(1)
    # 6,000 draws resolve a wrong residual or acceptance rule at p = 0.001 on this 6-token vocabulary
    draws = 6000
    firsts = torch.multinomial(q[0], draws, replacement=True).tolist() if draft_q else [1] * draws
    tokens = [verify(logits, [first, 1], request, None, gen, q).tokens[0] for first in firsts]
    counts = torch.bincount(torch.tensor(tokens), minlength=6).float()
    target = logits[0] / params.temperature
    if params.top_k:
        target = torch.where(target >= target.topk(params.top_k).values[-1], target, torch.tensor(float("-inf")))
    probs = target.softmax(-1)
    if params.top_p < 1:
        order = probs.argsort(descending=True)
        keep = torch.zeros(6, dtype=torch.bool)
        cutoff = int((probs[order].cumsum(0) < params.top_p).sum()) + 1
        keep[order[:cutoff]] = True
        probs = torch.where(keep, target, torch.tensor(float("-inf"))).softmax(-1)
    chi_square_ok(counts, probs)


def test_sampled_requests_with_spec_share_a_batch(spec_model):
    llm = LLM(spec_model, dtype="float32", speculative={"method": "ngram", "num_tokens": 3})
    prompts = repetitive_prompts(6, seed=11)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=30, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3) for i in range(6)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 30 for o in outs)
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    # the penalised greedy requests are not speculated and equal plain decoding
    plain = LLM(spec_model, dtype="float32").generate([prompts[0]], params[0], use_tqdm=False)[0]
    assert outs[0].outputs[0].token_ids == plain.outputs[0].token_ids
