"""Every attention backend against the torch_paged reference, on mixed batches."""

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.attention import kv_cache_shapes, make_backend, resolve_backend
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
    outs = {}
    for name in ("torch_paged", "cpu_paged"):
        k_shape, v_shape = kv_cache_shapes(num_blocks, kv_heads, block_size, dim)
        torch.manual_seed(1)  # the same "earlier context" in both caches
        caches = [(torch.randn(k_shape, dtype=dtype), torch.randn(v_shape, dtype=dtype))]
        caches[0][0][0].zero_()
        caches[0][1][0].zero_()
        ctx = make_backend(name, caches, block_size).build(layout)
        outs[name] = ctx.attend(0, q, k, v, dim**-0.5, window).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs["cpu_paged"], outs["torch_paged"], atol=tol, rtol=tol)


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
