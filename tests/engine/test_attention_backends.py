"""Every attention backend against the torch_paged reference, on mixed batches."""

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.attention import KVLayout, make_backend, resolve_backend
from ember.engine.attention.cpu_paged import bf16_pairs_supported
from ember.engine.attention.torch_paged import BatchLayout


def random_layout(query_lens, context_lens, block_size, num_blocks, device="cpu"):
    g = torch.Generator().manual_seed(0)
    free = torch.randperm(num_blocks - 1, generator=g) + 1
    tables, used = [], 0
    for q, c in zip(query_lens, context_lens):
        n = -(-(q + c) // block_size)
        tables.append(free[used:used + n].tolist())
        used += n
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    positions = torch.cat([torch.arange(c, c + q) for q, c in zip(query_lens, context_lens)])
    request = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
    slots = block_tables[request, positions // block_size] * block_size + positions % block_size
    return BatchLayout(query_lens, context_lens, block_tables, slots, positions)


LAYOUTS = [("torch_paged", False), ("cpu_paged", False), ("cpu_paged", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1), (4, 4)])
def test_cpu_paged_matches_reference(dtype, window, heads, kv_heads):
    if resolve_backend("auto", torch.device("cpu"), (heads, kv_heads, 32, 16)) != "cpu_paged":
        pytest.skip("cpu_paged kernels unavailable")
    torch.manual_seed(0)
    block_size, dim, num_blocks = 16, 32, 64
    # decodes, a short chunk over context, a fresh prompt, a long chunk over context
    query_lens, context_lens = [1, 1, 1, 5, 40, 70], [0, 17, 100, 33, 0, 50]
    layout = random_layout(query_lens, context_lens, block_size, num_blocks)
    n = sum(query_lens)
    q = torch.randn(n, heads, dim, dtype=dtype)
    k = torch.randn(n, kv_heads, dim, dtype=dtype)
    v = torch.randn(n, kv_heads, dim, dtype=dtype)
    # the "earlier context": every cached position of every request
    past_slots = torch.cat([layout.block_tables[i, torch.arange(c) // block_size] * block_size + torch.arange(c) % block_size
                            for i, c in enumerate(context_lens)])
    past_k = torch.randn(len(past_slots), kv_heads, dim, dtype=dtype)
    past_v = torch.randn(len(past_slots), kv_heads, dim, dtype=dtype)
    outs = {}
    for name, paired in LAYOUTS:
        if paired and (dtype != torch.bfloat16 or not bf16_pairs_supported()):
            continue
        kv_layout = KVLayout(paired)
        k_shape, v_shape = kv_layout.shapes(num_blocks, kv_heads, block_size, dim)
        caches = [(torch.zeros(k_shape, dtype=dtype), torch.zeros(v_shape, dtype=dtype))]
        kv_layout.write(*caches[0], past_slots, past_k, past_v)
        ctx = make_backend(name, caches, block_size, kv_layout).build(layout)
        outs[(name, paired)] = ctx.attend(0, q, k, v, dim**-0.5, window).float()
    reference = outs.pop(("torch_paged", False))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for key, out in outs.items():
        torch.testing.assert_close(out, reference, atol=tol, rtol=tol, msg=lambda m: f"{key}: {m}")


def test_paired_layout_round_trips():
    kv_layout = KVLayout(paired=True)
    k_shape, v_shape = kv_layout.shapes(4, 2, 16, 8)
    k_cache, v_cache = torch.zeros(k_shape), torch.zeros(v_shape)
    slots = torch.tensor([17, 18, 30, 5])
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    kv_layout.write(k_cache, v_cache, slots, k, v)
    table = torch.tensor([0, 1])
    gk, gv = kv_layout.gather(k_cache, table, keys=True), kv_layout.gather(v_cache, table, keys=False)
    torch.testing.assert_close(gk[:, slots].transpose(0, 1), k)
    torch.testing.assert_close(gv[:, slots].transpose(0, 1), v)


def test_engines_with_each_backend_agree(model_factory):
    path = str(model_factory("mistral", std=0.1, sliding_window=24))
    prompts = [list(range(3, 3 + n)) for n in (1, 9, 30, 70)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
    results = {}
    for backend in ("torch_paged", "auto"):
        llm = LLM(path, dtype="float32", attention_backend=backend, max_num_batched_tokens=64)
        results[backend] = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(results["torch_paged"], results["auto"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            tok = next(iter(x))
            assert abs(x[tok].logprob - y[tok].logprob) < 1e-4
