"""Automatic prefix caching and chunked prefill: same outputs as the uncached, unchunked path."""

import pytest
import torch

from ember import LLM, SamplingParams
from tests.conftest import VOCAB


def shared_prefix_batch():
    g = torch.Generator().manual_seed(11)
    rand = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    base = rand(100)
    prompts = [
        base[:7] + rand(5),        # shares less than a block
        base[:16] + rand(9),       # shares exactly one block
        base[:32] + rand(1),       # shares two blocks, then one token
        base[:48],                 # a whole prompt that is a cached prefix (block boundary)
        base[:48],                 # the same prompt twice in one batch
        base[:64] + rand(30),
        base[:100],
        rand(40),                  # unrelated
    ]
    return prompts


@pytest.mark.parametrize("budget", [16, 64, 512])
def test_outputs_identical_with_prefix_caching_and_chunking(model_factory, budget):
    path = str(model_factory("llama", std=0.1))
    prompts = shared_prefix_batch()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference = LLM(path, dtype="float32", enable_prefix_caching=False, enable_chunked_prefill=False)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    llm = LLM(path, dtype="float32", enable_prefix_caching=True, max_num_batched_tokens=budget, max_num_seqs=16)
    for _ in range(2):  # the second round finds everything cached
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == expected
    stats = llm.engine.get_stats()
    assert stats["prefix_cache_hits"] > 0
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_hit_rate_and_cached_tokens_by_hand(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", block_size=16)
    params = SamplingParams(temperature=0, max_tokens=1)
    prefix = list(range(10, 42))  # 32 tokens = 2 blocks
    first = llm.generate([prefix + [1, 2, 3]], params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    second = llm.generate([prefix + [4, 5]], params, use_tqdm=False)[0]
    assert second.num_cached_tokens == 32
    # 35 tokens queried with no hit, then 34 with 32 hits
    stats = llm.engine.get_stats()
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (69, 32)
    assert stats["prefix_cache_hit_rate"] == pytest.approx(32 / 69)
    # a fully cached prompt still computes its last token (at most 31 of 32 tokens hit... here 16)
    third = llm.generate([prefix], params, use_tqdm=False)[0]
    assert third.num_cached_tokens == 16


def test_prefix_caching_off_reports_nothing(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", enable_prefix_caching=False)
    p = list(range(5, 60))
    llm.generate([p, p], SamplingParams(max_tokens=2), use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["prefix_cache_queries"] == 0 and stats["prefix_cache_hits"] == 0


def test_preempted_recompute_is_not_a_new_query(model_factory):
    path = str(model_factory("llama", std=0.1))
    # A pool of 20 blocks: 4 requests of up to 6 blocks each cannot all run to the end together.
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4
    llm = LLM(path, dtype="float32", kv_cache_gib=21 * block_bytes / 2**30, max_num_batched_tokens=64)
    prompts = [[i] * 20 for i in range(1, 5)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=75, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["num_preemptions"] > 0
    assert stats["prefix_cache_queries"] == 4 * 20


def test_priority_policy_serves_urgent_requests_first(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", policy="priority", max_num_seqs=1)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3)
    engine.add_request("late-low", [1, 2, 3], params, priority=10)
    engine.add_request("urgent", [4, 5, 6], params, priority=-5)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["urgent", "late-low"]
