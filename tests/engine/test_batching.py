"""Continuous batching: outputs independent of batch composition and preemption."""

import torch

from ember import LLM, SamplingParams
from tests.conftest import VOCAB


def random_prompts(n, seed, low=4, high=120):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (length,), generator=g).tolist() for length in lengths]


def test_greedy_is_batch_invariant_and_survives_preemption(model_factory):
    path = str(model_factory("llama", std=0.1))
    prompts = random_prompts(32, seed=3)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)

    alone = LLM(path, dtype="float32")
    singles = [alone.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:6]]

    batched = alone.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched[:6]] == singles

    # ~28 blocks of 16 tokens cannot hold 32 requests of up to 167 tokens: preemption must happen.
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4
    tight = LLM(path, dtype="float32", kv_cache_gib=28 * block_bytes / 2**30, max_num_batched_tokens=256)
    squeezed = tight.generate(prompts, params, use_tqdm=False)
    stats = tight.engine.get_stats()
    assert stats["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in squeezed] == [o.outputs[0].token_ids for o in batched]
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == 0


def test_chunked_prefill_and_budget_do_not_change_outputs(model_factory):
    path = str(model_factory("llama", std=0.1))
    prompts = random_prompts(8, seed=4, low=30, high=300)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in LLM(path, dtype="float32", enable_chunked_prefill=False).generate(prompts, params, use_tqdm=False)]
    for budget in (16, 64, 512):
        llm = LLM(path, dtype="float32", max_num_batched_tokens=budget, max_num_seqs=16)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == reference, f"budget {budget}"


def test_outputs_come_back_in_input_order_with_mixed_lengths(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    prompts = ["a", "The quick brown fox jumps over the lazy dog. " * 4, "Hello"]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (30, 2, 9)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [30, 2, 9]
    assert [o.prompt for o in outs] == prompts
    assert all(o.finished for o in outs)


def test_step_can_return_only_finished_requests(llama_dir):
    """Offline batches ask the engine for finished requests only; streaming callers get every step."""
    engine = LLM(str(llama_dir), dtype="float32").engine
    engine.add_request("short", [5, 6, 7], SamplingParams(temperature=0, ignore_eos=True, max_tokens=2))
    engine.add_request("long", [8, 9], SamplingParams(temperature=0, ignore_eos=True, max_tokens=5))
    streamed = engine.step()  # prompts + each request's first token
    assert {o.request_id for o in streamed} == {"short", "long"} and not any(o.finished for o in streamed)
    seen = []
    while engine.has_unfinished_requests():
        outputs = engine.step(finished_only=True)
        assert all(o.finished for o in outputs)
        seen += [(o.request_id, len(o.outputs[0].token_ids)) for o in outputs]
    assert seen == [("short", 2), ("long", 5)]
