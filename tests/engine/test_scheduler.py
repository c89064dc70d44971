"""Scheduler and KV block pool, driven directly with a hand-written runner (no model)."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ember.engine.config import SchedulerConfig
from ember.engine.kv_cache import KVCacheManager
from ember.engine.request import Request, RequestStatus, SamplingParams
from ember.engine.scheduler import Scheduler


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, max_model_len=256, prefix=True,
                   policy="fcfs", chunked=True):
    kv = KVCacheManager(num_blocks, block_size, prefix)
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, policy=policy,
                             enable_chunked_prefill=chunked)
    return Scheduler(config, kv, max_model_len)


def make_request(request_id, prompt, max_tokens, priority=0, arrival=None):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id, prompt, params, max_tokens, priority=priority, arrival_time=arrival)


def run_step(scheduler, rng=random):
    out = scheduler.schedule()
    live = list(scheduler.running) + [r for r in scheduler.waiting]
    scheduler.kv.check_invariants(live)
    sampled = {r.seq_id: [rng.randrange(1000)] for r, n in out.scheduled if r.num_computed_tokens == r.num_tokens}
    scheduler.update_from_output(out, sampled)
    return out


def test_decodes_run_every_step_while_a_long_prompt_is_chunked():
    s = make_scheduler(budget=16, num_blocks=128)
    for i in range(4):
        s.add_request(make_request(f"d{i}", [i] * 5, max_tokens=50))
    run_step(s)  # the four short prompts: 20 tokens > 16, so one is chunked
    run_step(s)
    s.add_request(make_request("long", list(range(100)), max_tokens=5))
    for _ in range(6):
        out = run_step(s)
        per_request = {r.request_id: n for r, n in out.scheduled}
        assert all(per_request.get(f"d{i}") == 1 for i in range(4))  # decodes never starve
        assert per_request["long"] == 12  # the rest of the budget
        assert out.num_tokens <= 16


def test_preempts_the_most_recently_admitted_and_recomputes():
    s = make_scheduler(num_blocks=9, block_size=4, budget=64)  # 8 usable blocks = 32 tokens
    a, b = make_request("a", [1] * 8, 12), make_request("b", [2] * 8, 12)
    s.add_request(a)
    s.add_request(b)
    run_step(s)
    while s.num_preemptions == 0:
        run_step(s)
    assert b.status in (RequestStatus.PREEMPTED, RequestStatus.WAITING) and b.num_computed_tokens == 0
    assert a.status is RequestStatus.RUNNING
    while s.has_unfinished_requests():
        run_step(s)
    assert a.num_output_tokens == b.num_output_tokens == 12
    assert s.kv.num_free_blocks == s.kv.num_usable_blocks


def test_request_that_can_never_fit_is_rejected():
    s = make_scheduler(num_blocks=5, block_size=4)  # 16 tokens
    import pytest

    with pytest.raises(ValueError, match="can never fit"):
        s.add_request(make_request("big", [1] * 10, max_tokens=10))
    s.add_request(make_request("ok", [1] * 10, max_tokens=6))


def test_priority_policy_orders_admission_and_picks_victims():
    s = make_scheduler(policy="priority", max_seqs=1)
    s.add_request(make_request("low", [1] * 4, 2, priority=5, arrival=0.0))
    s.add_request(make_request("high", [2] * 4, 2, priority=-1, arrival=1.0))
    out = run_step(s)
    assert [r.request_id for r, _ in out.scheduled] == ["high"]


def test_prefix_cache_hits_match_hand_computed_figures():
    s = make_scheduler(block_size=4, budget=64)
    shared = list(range(100, 110))  # 2 full blocks + 2 tokens
    first = make_request("first", shared + [1, 2, 3], 1)
    s.add_request(first)
    run_step(s)
    assert s.kv.num_queried_tokens == 13 and s.kv.num_hit_tokens == 0
    second = make_request("second", shared + [7, 8], 1)
    s.add_request(second)
    out = run_step(s)
    # blocks [100..103] and [104..107] are shared: 8 tokens hit, 4 computed
    assert second.num_cached_tokens == 8 and dict((r.request_id, n) for r, n in out.scheduled)["second"] == 4
    assert s.kv.num_queried_tokens == 25 and s.kv.num_hit_tokens == 8
    # the same prompt again, fully cached: the last token is still computed
    third = make_request("third", shared + [1, 2], 1)
    s.add_request(third)
    out = run_step(s)
    assert third.num_cached_tokens == 8
    assert s.kv.hit_rate == 16 / 37


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(12, 80),
    budget=st.integers(4, 48),
    max_seqs=st.integers(1, 8),
    prefix=st.booleans(),
    chunked=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
)
def test_random_churn_keeps_accounting_exact(seed, num_blocks, budget, max_seqs, prefix, chunked, policy):
    rng = random.Random(seed)
    block_size = 4
    max_len = (num_blocks - 1) * block_size
    s = make_scheduler(num_blocks, block_size, budget if chunked else max_len, max_seqs, max_len, prefix, policy, chunked)
    shared = [rng.randrange(50) for _ in range(20)]
    requests, aborted = [], set()
    for step in range(200):
        if rng.random() < 0.3 and len(requests) < 40:
            prompt = shared[: rng.randrange(0, 20)] + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
            r = make_request(f"r{len(requests)}", prompt, rng.randrange(1, 16), priority=rng.randrange(3))
            try:
                s.add_request(r)
                requests.append(r)
            except ValueError:
                pass
        if rng.random() < 0.05 and s.requests:
            victim = rng.choice(list(s.requests.values()))  # running, waiting or preempted
            s.finish_request(victim, RequestStatus.FINISHED_ABORTED)
            aborted.add(victim.request_id)
        out = run_step(s, rng)
        assert out.num_tokens <= s.config.max_num_batched_tokens
        assert len(out.scheduled) <= max_seqs
    while s.has_unfinished_requests():
        run_step(s, rng)
    assert s.kv.num_free_blocks == s.kv.num_usable_blocks
    assert all(c == 0 for c in s.kv.ref_cnt)
    for r in requests:
        if r.request_id not in aborted:
            assert r.num_output_tokens == min(r.max_tokens, max_len - r.num_prompt_tokens), r


def test_emptied_blocks_are_reused_first_and_cached_ones_last():
    """Blocks that cache nothing are taken again before never-used ones (their memory is
    warm); cached blocks wait behind both, and a cache reset turns them into emptied blocks."""
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)

    def allocate(request_id, prompt):
        request = make_request(request_id, prompt, max_tokens=4)
        assert kv.allocate_slots(request, len(prompt))
        request.num_computed_tokens = len(prompt)
        return request

    first = allocate("a", list(range(10)))  # two full blocks (cached) and a partial one
    full, partial = first.block_ids[:2], first.block_ids[2]
    kv.free(first)
    second = allocate("b", list(range(100, 106)))  # unrelated: two blocks
    assert second.block_ids[0] == partial  # the emptied block first
    assert not set(second.block_ids) & set(full)  # then a never-used one, not a cached block
    second_blocks = set(second.block_ids)
    kv.free(second)
    kv.reset_prefix_cache()
    third = allocate("c", list(range(200, 216)))  # four blocks
    assert set(third.block_ids) == set(full) | second_blocks  # only warm blocks
    kv.check_invariants([third])
