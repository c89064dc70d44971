"""Sampler: seeded reproducibility, the distributions it draws from, and exact logits processing."""

import math

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.logits import apply_logits_processors
from ember.engine.request import Request
from ember.engine.sampler import Sampler, sampling_probs

# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


def make_request(params, prompt=(1, 2, 3), output=(), eos=(0,), request_id="r"):
    request = Request(request_id, list(prompt), params, max_tokens=100, eos_token_ids=eos)
    for token in output:
        request.append_output_token(token)
    return request


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> None:
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token with zero probability"
    n = counts.sum()
    expected = probs[support] * n
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    df = int(support.sum()) - 1
    assert stat < CHI2_999[df], f"chi2 {stat:.1f} >= {CHI2_999[df]} (df {df})"


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def expected_probs(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    logits = LOGITS / temperature
    order = logits.argsort(descending=True)
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k:
        keep[order[top_k:]] = False
    probs = torch.where(keep, logits, -math.inf).softmax(-1)
    if top_p < 1:
        sorted_probs = probs[order]
        # keep the smallest prefix whose mass reaches top_p
        cum = sorted_probs.cumsum(0)
        cutoff = int((cum < top_p).sum()) + 1
        keep[order[cutoff:]] = False
        probs = torch.where(keep, logits, -math.inf).softmax(-1)
    if min_p:
        keep &= probs >= min_p * probs.max()
        probs = torch.where(keep, logits, -math.inf).softmax(-1)
    return probs


TRANSFORMS = [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=1.7), dict(top_k=3), dict(top_p=0.8),
              dict(min_p=0.2), dict(temperature=0.8, top_k=5, top_p=0.9)]


def test_one_sampling_transform_for_mixed_rows():
    """sampling_probs (what the sampler, the speculative verifier and the draft model draw
    from): each row gets its own temperature/top-k/top-p/min-p, exactly."""
    got = sampling_probs(LOGITS.repeat(len(TRANSFORMS), 1), [SamplingParams(**kw) for kw in TRANSFORMS])
    want = torch.stack([expected_probs(**kw) for kw in TRANSFORMS])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs", TRANSFORMS)
def test_sampler_draws_from_the_right_distribution(kwargs):
    rows = 20000
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = SamplingParams(**kwargs)
    requests = [make_request(params, request_id=str(i)) for i in range(rows)]
    result = sampler(LOGITS.repeat(rows, 1), requests, [None] * rows)
    counts = torch.bincount(torch.tensor(result.token_ids), minlength=len(LOGITS)).float()
    chi_square_ok(counts, expected_probs(**kwargs))


def test_greedy_takes_the_argmax_and_logprobs_are_raw():
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0)
    request = make_request(params, prompt=[0])
    result = sampler(LOGITS[None].clone(), [request], [None])
    # the penalty halves token 0's logit (2.0 -> 1.0), so token 1 wins ...
    assert result.token_ids == [1]
    # ... but reported logprobs are the model's, before processing
    raw = LOGITS.log_softmax(-1)
    info = result.logprobs[0]
    assert info.top_ids == [0, 1, 2] and info.rank == 2
    assert abs(info.logprob - raw[1].item()) < 1e-6


def test_penalties_and_bias_change_logits_exactly():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={5: -4.0, 4: 1.0})
    # prompt has tokens 0 and 1; the output has token 1 once and token 3 twice
    request = make_request(params, prompt=[0, 1], output=[1, 3, 3], eos=())
    apply_logits_processors(logits, [request])
    expected = torch.tensor([
        2.0 / 1.5,                       # seen in the prompt: positive / p
        -1.0 * 1.5 - 0.5 - 0.25 * 1,     # seen, negative * p; once in output
        0.5,                             # untouched
        3.0 / 1.5 - 0.5 - 0.25 * 2,      # twice in output
        -2.0 + 1.0,                      # bias only
        1.0 - 4.0,                       # bias only
    ])
    torch.testing.assert_close(logits[0], expected)


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(1, 6)
    params = SamplingParams(min_tokens=2, stop_token_ids=[4])
    apply_logits_processors(logits, [make_request(params, output=[3], eos=(5,))])
    assert logits[0, 5] == -math.inf and logits[0, 4] == -math.inf and logits[0, :4].eq(0).all()
    logits = torch.zeros(1, 6)
    apply_logits_processors(logits, [make_request(params, output=[3, 3], eos=(5,))])
    assert logits.eq(0).all()


def test_seeded_sampling_is_reproducible_whatever_the_batch(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    noise = SamplingParams(temperature=1.2, max_tokens=30, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(
        ["x" * 40, "Once upon a time", "The sky", "Numbers: 1 2 3"],
        [noise, seeded, noise, noise], use_tqdm=False,
    )[1].outputs[0].token_ids
    assert alone == mixed
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True)
    assert llm.generate(["Once upon a time"], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_samples_are_distinct_and_indexed(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    out = llm.generate(["Hello"], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3


def test_engine_first_token_follows_the_model_distribution(model_factory):
    """End to end: n draws of a first token under top_k=4 match softmax of the model's logits."""
    path = model_factory("llama", std=0.1)
    llm = LLM(str(path), dtype="float32")
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        logits = llm.engine.model(torch.tensor([prompt], device=llm.engine.device))[0, -1].float().cpu()
    top = logits.topk(4)
    probs = torch.zeros_like(logits)
    probs[top.indices] = (top.values / 0.9).softmax(-1)
    # 25 prompts x n=120: 3000 draws within the per-request bound on n
    outs = llm.generate([prompt] * 25, SamplingParams(n=120, temperature=0.9, top_k=4, max_tokens=1), use_tqdm=False)
    firsts = torch.tensor([o.token_ids[0] for out in outs for o in out.outputs])
    chi_square_ok(torch.bincount(firsts, minlength=len(logits)).float(), probs)
