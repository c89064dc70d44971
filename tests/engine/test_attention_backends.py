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


def int8_reference(k: torch.Tensor) -> torch.Tensor:
    """What an int8 cache gives back: per token and head, absmax / 127 steps."""
    from ember.engine.attention.torch_paged import quantize_heads

    q, scale = quantize_heads(k)
    return (q.float() * scale.float()[..., None]).to(k.dtype)


# decodes, a short chunk over context, a fresh prompt, a long chunk over context; then chunks over
# context of many lengths (the kernel's multi-row tiles, a short last tile); then a big batch of
# decodes (one kernel work item per row over all KV heads) beside a chunk
BATCHES = [([1, 1, 1, 5, 40, 70], [0, 17, 100, 33, 0, 50]), ([1, 3, 19, 40, 70], [9, 17, 100, 60, 50]),
           ([1] * 70 + [5], [i * 37 % 90 for i in range(70)] + [20])]


def zeroed(caches):
    for cache in caches:
        cache[0].zero_()
        cache[1].zero_()
    return caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 32), (6, 1, 32), (4, 4, 32), (8, 1, 32), (14, 2, 80)])
@pytest.mark.parametrize("batch", [0, 1, 2])
def test_cpu_paged_matches_reference(dtype, window, heads, kv_heads, dim, batch):
    if resolve_backend("auto", torch.device("cpu"), (heads, kv_heads, dim, 16)) != "cpu_paged":
        pytest.skip("cpu_paged kernels unavailable")
    torch.manual_seed(0)
    query_lens, context_lens = BATCHES[batch]
    block_size = 16
    num_blocks = max(64, sum(-(-(q + c) // block_size) for q, c in zip(query_lens, context_lens)) + 1)
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
        kv_layout = KVLayout(paired, dtype=dtype)
        caches = zeroed(kv_layout.allocate(1, num_blocks, kv_heads, block_size, dim))  # the engine's layout
        kv_layout.write(caches[0], past_slots, past_k, past_v)
        ctx = make_backend(name, caches, block_size, kv_layout).build(layout)
        outs[(name, paired)] = ctx.attend(0, q, k, v, dim**-0.5, window).float()
    reference = outs.pop(("torch_paged", False))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for key, out in outs.items():
        torch.testing.assert_close(out, reference, atol=tol, rtol=tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("window", [0, 20, 100])
def test_transposed_kernel_decodes_match_float64_and_do_not_depend_on_the_batch(dtype, block_size, window):
    """The transposed-layout kernel (fp32, and bf16 without AVX512-BF16): decode rows whose keys span several
    softmax spans and blocks, windows that start inside a span, a cache whose unwritten slots are NaN; each
    row is the same bits alone as in the batch, and matches attention computed in float64."""
    if resolve_backend("auto", torch.device("cpu"), (9, 3, 64, block_size)) != "cpu_paged":
        pytest.skip("cpu_paged kernels unavailable")
    g = torch.Generator().manual_seed(block_size + window)
    heads, kv_heads, dim = 9, 3, 64
    lens = [1, 15, 16, 17, 64, 65, 130, 300]
    num_blocks = sum(-(-n // block_size) for n in lens) + 1
    k_cache, v_cache = KVLayout(paired=False, dtype=dtype).allocate(1, num_blocks, kv_heads, block_size, dim)[0]
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    tables = torch.zeros(len(lens), -(-max(lens) // block_size), dtype=torch.long)
    free = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    keys, values = [], []
    for r, n in enumerate(lens):
        tables[r, :-(-n // block_size)] = torch.tensor([free.pop() for _ in range(-(-n // block_size))])
        pos = torch.arange(n)
        blocks, offsets = tables[r, pos // block_size], pos % block_size
        keys.append(torch.randn(n, kv_heads, dim, generator=g).to(dtype))
        values.append(torch.randn(n, kv_heads, dim, generator=g).to(dtype))
        k_cache[blocks, :, :, offsets] = keys[-1]  # [blocks, kv_heads, dim, block_size]
        v_cache[blocks, :, offsets, :] = values[-1]  # [blocks, kv_heads, block_size, dim]
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    scale = dim**-0.5

    def attend(rows):
        return torch.ops.ember_cpu.paged_attention(q[rows], k_cache, v_cache, tables[rows], torch.arange(len(rows)),
                                                   torch.tensor([lens[r] for r in rows]), window, scale)

    batch = attend(list(range(len(lens))))
    for r, n in enumerate(lens):
        assert torch.equal(attend([r]), batch[r:r + 1])
        first = max(0, n - window) if window else 0
        k, v = keys[r][first:].double(), values[r][first:].double()
        scores = torch.einsum("hgd,nhd->hgn", q[r].double().view(kv_heads, -1, dim), k) * scale
        expected = torch.einsum("hgn,nhd->hgd", scores.softmax(-1), v).reshape(heads, dim)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(batch[r].double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["torch_paged", "cpu_paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
def test_int8_cache_matches_dequantized_reference(backend, dtype, window):
    """int8 K/V through each backend = attention over the dequantized K/V with the exact backend."""
    heads, kv_heads, block_size, dim, num_blocks = 4, 2, 16, 32, 64
    if backend == "cpu_paged" and resolve_backend("auto", torch.device("cpu"), (heads, kv_heads, dim, block_size)) != "cpu_paged":
        pytest.skip("cpu_paged kernels unavailable")
    torch.manual_seed(1)
    query_lens, context_lens = [1, 1, 3, 40, 70], [0, 45, 17, 0, 50]
    layout = random_layout(query_lens, context_lens, block_size, num_blocks)
    n = sum(query_lens)
    q, k, v = (torch.randn(n, h, dim, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    past_slots = torch.cat([layout.block_tables[i, torch.arange(c) // block_size] * block_size + torch.arange(c) % block_size
                            for i, c in enumerate(context_lens)])
    past_k, past_v = (torch.randn(len(past_slots), kv_heads, dim, dtype=dtype) * 3 for _ in range(2))

    def run(kv_layout, name, k_new, v_new, pk, pv):
        cache = zeroed(kv_layout.allocate(1, num_blocks, kv_heads, block_size, dim))[0]
        kv_layout.write(cache, past_slots, pk, pv)
        return make_backend(name, [cache], block_size, kv_layout).build(layout).attend(0, q, k_new, v_new, dim**-0.5, window)

    quantized = run(KVLayout(quantized=True, dtype=dtype), backend, k, v, past_k, past_v).float()
    # Fresh prompts attend over their own unquantized K/V (as every engine does); cached context is int8.
    reference = run(KVLayout(dtype=dtype), "torch_paged", k, v, int8_reference(past_k), int8_reference(past_v))
    ends = torch.tensor(query_lens).cumsum(0)
    fresh = torch.zeros(n, dtype=torch.bool)
    for i, (ql, cl) in enumerate(zip(query_lens, context_lens)):
        if cl == 0 and ql > 16:
            fresh[ends[i] - ql:ends[i]] = True
    # Rows over cached context read the new tokens back from the int8 cache too.
    reference_cached = run(KVLayout(dtype=dtype), "torch_paged", int8_reference(k), int8_reference(v),
                           int8_reference(past_k), int8_reference(past_v))
    expected = torch.where(fresh[:, None, None], reference, reference_cached).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(quantized, expected, atol=tol, rtol=tol)
    # And against the unquantized cache: a small, bounded error.
    exact = run(KVLayout(dtype=dtype), "torch_paged", k, v, past_k, past_v).float()
    relative = (quantized - exact).abs().mean() / exact.abs().mean()
    assert relative < 0.02, relative


def test_int8_cache_holds_twice_the_tokens():
    from ember.engine.runner import kv_bytes_per_block
    from ember.models.config import ModelConfig

    config = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 512,
                                    "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
                                    "num_key_value_heads": 4, "vocab_size": 32000})
    bf16 = kv_bytes_per_block(config, 16, torch.bfloat16)
    int8 = kv_bytes_per_block(config, 16, torch.bfloat16, "int8")
    assert bf16 / int8 == pytest.approx(128 / 66)  # head_dim 64: 64 int8 values + a bf16 scale vs 64 bf16 values
    assert kv_bytes_per_block(config, 16, torch.float32) / int8 == pytest.approx(256 / 66)


def test_paired_layout_round_trips():
    kv_layout = KVLayout(paired=True)
    k_cache, v_cache = zeroed(kv_layout.allocate(2, 4, 2, 16, 8))[1]
    # block b's K then V, side by side: one stretch of memory per block
    block_bytes = k_cache[0].numel() * k_cache.element_size()
    assert k_cache.stride(0) == v_cache.stride(0) == 2 * k_cache[0].numel()
    assert v_cache.data_ptr() - k_cache.data_ptr() == block_bytes
    slots = torch.tensor([17, 18, 30, 5])
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    kv_layout.write((k_cache, v_cache), slots, k, v)
    table = torch.tensor([0, 1])
    gk, gv = kv_layout.gather((k_cache, v_cache), table, keys=True), kv_layout.gather((k_cache, v_cache), table, keys=False)
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


@pytest.mark.parametrize("backend", ["torch_paged", "auto"])
def test_stale_cache_contents_never_reach_outputs(llama_dir, backend):
    """The KV buffer is never cleared (freed memory comes back dirty): fill it with NaN first."""
    import math

    prompts = [list(range(3, 3 + n)) for n in (5, 17, 30)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    results = []
    for dirty in (False, True):
        llm = LLM(str(llama_dir), dtype="bfloat16", attention_backend=backend, kv_cache_gib=0.01)
        if dirty:
            for cache in llm.engine.runner.kv_caches:
                for tensor in cache:
                    tensor[1:].fill_(float("nan"))  # every block but the null block
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert not any(math.isnan(v.logprob) for o in outs for lp in o.outputs[0].logprobs for v in lp.values())
        results.append([o.outputs[0].token_ids for o in outs])
    assert results[0] == results[1]


@pytest.mark.skipif(not bf16_pairs_supported(), reason="no AVX512-BF16 kernel here")
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_paired_write_kernel_matches_the_layout(tokens):
    """write_paired (one C++ pass) stores exactly what KVLayout.write's index_puts store, from
    K/V rows that are strided views into a fused qkv output, as the model hands them over."""
    kv_layout = KVLayout(paired=True, dtype=torch.bfloat16)
    k_shape, v_shape = kv_layout.shapes(8, 2, 16, 32)
    g = torch.Generator().manual_seed(tokens)
    slots = torch.randperm(8 * 16, generator=g)[:tokens]
    qkv = torch.randn(tokens, 5 * 64, generator=g).to(torch.bfloat16)
    k, v = qkv[:, 64:128].unflatten(-1, (2, 32)), qkv[:, 128:192].unflatten(-1, (2, 32))
    expected = torch.zeros(k_shape, dtype=torch.bfloat16), torch.zeros(v_shape, dtype=torch.bfloat16)
    kv_layout.write(expected, slots, k, v)
    got = zeroed(kv_layout.allocate(1, 8, 2, 16, 32))[0]  # K and V blocks interleaved, as the engine has them
    torch.ops.ember_cpu.write_paired(got[0], got[1], k, v, slots // 16, slots % 16)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.ember_cpu.write_paired(got[0], got[1], k, v, slots // 16 + 8, slots % 16)


@pytest.mark.skipif(not bf16_pairs_supported(), reason="no AVX512-BF16 kernel here")
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 20])
def test_decode_rows_match_reference_and_do_not_depend_on_the_batch(block_size, window):
    """Decodes in a big batch (one work item per row over all KV heads) and the same rows alone (one
    item per head) give the same bits, and match the reference; blocks of 32 keys hold two of the kernel's
    16-key chunks each (chunks that start inside a block). The NaN-filled cache checks that no unwritten
    slot is read."""
    torch.manual_seed(0)
    heads, kv_heads, dim, n = 8, 4, 32, 70
    context_lens = [1 + i * 53 % 150 for i in range(n)]
    num_blocks = sum(-(-(c + 1) // block_size) for c in context_lens) + 1
    layout = random_layout([1] * n, context_lens, block_size, num_blocks)
    past_slots = torch.cat([layout.block_tables[i, torch.arange(c) // block_size] * block_size + torch.arange(c) % block_size
                            for i, c in enumerate(context_lens)])
    past_k, past_v = (torch.randn(len(past_slots), kv_heads, dim).to(torch.bfloat16) for _ in range(2))
    q = torch.randn(n, heads, dim).to(torch.bfloat16)
    k, v = (torch.randn(n, kv_heads, dim).to(torch.bfloat16) for _ in range(2))
    outs = {}
    for name, paired in (("torch_paged", False), ("cpu_paged", True)):
        kv_layout = KVLayout(paired, dtype=torch.bfloat16)
        caches = kv_layout.allocate(1, num_blocks, kv_heads, block_size, dim)
        for cache in caches[0]:
            cache.fill_(float("nan"))
        kv_layout.write(caches[0], past_slots, past_k, past_v)
        backend = make_backend(name, caches, block_size, kv_layout)
        outs[name] = backend.build(layout).attend(0, q, k, v, dim**-0.5, window)
        if paired:
            few = [3, 40, 69]  # alone: too few rows for the wide items
            small = BatchLayout([1] * len(few), [context_lens[i] for i in few], layout.block_tables[few],
                                layout.slot_mapping[few], layout.positions[few])
            alone = backend.build(small).attend(0, q[few], k[few], v[few], dim**-0.5, window)
            assert torch.equal(alone, outs[name][few])
    torch.testing.assert_close(outs["cpu_paged"].float(), outs["torch_paged"].float(), atol=3e-2, rtol=3e-2)


def write_then_attend(g, num_blocks, kv_heads, block_size, q, k, v, blocks, offsets, tables, lens, window):
    """Two paired caches with the same random contents; the first gets write_paired + paged_attention.
    Returns both caches and that attention's output (the reference for decode_attention_paired)."""
    dim = q.shape[-1]
    start = torch.randn(2, num_blocks, kv_heads * block_size * dim, generator=g).to(torch.bfloat16)
    caches = []
    for _ in range(2):
        cache = KVLayout(paired=True, dtype=torch.bfloat16).allocate(1, num_blocks, kv_heads, block_size, dim)[0]
        cache[0].view(num_blocks, -1).copy_(start[0])
        cache[1].view(num_blocks, -1).copy_(start[1])
        caches.append(cache)
    torch.ops.ember_cpu.write_paired(caches[0][0], caches[0][1], k, v, blocks, offsets)
    rows = torch.arange(q.shape[0])
    return caches, torch.ops.ember_cpu.paged_attention(q, *caches[0], tables, rows, lens, window, 0.125)


@pytest.mark.skipif(not bf16_pairs_supported(), reason="no AVX512-BF16 kernel here")
@pytest.mark.parametrize("rows", [5, 200])  # one item per KV head; one per row over all heads (<= 12 threads)
@pytest.mark.parametrize("block_size,window", [(16, 0), (32, 0), (16, 20)])
def test_decode_kernel_writing_its_own_tokens_matches_write_then_attend(rows, block_size, window):
    """Decode-only batches: decode_attention_paired writes each row's new K/V inside the attention
    kernel; the cache afterwards and the output are the same bits as write_paired + paged_attention.
    A slot that is not the block table's position for the row is refused before anything is written."""
    g = torch.Generator().manual_seed(rows + block_size + window)
    heads, kv_heads, dim, num_blocks = 8, 4, 64, 12 * rows
    lens = torch.randint(1, 150, (rows,), generator=g)
    tables = (torch.randperm(num_blocks - 1, generator=g)[:rows * 10] + 1).view(rows, 10)
    blocks, offsets = tables[torch.arange(rows), (lens - 1) // block_size].contiguous(), (lens - 1) % block_size
    q = torch.randn(rows, heads, dim, generator=g).to(torch.bfloat16)
    kv = torch.randn(rows, 2 * kv_heads * dim, generator=g).to(torch.bfloat16)  # strided views, as the model's
    k, v = kv[:, :kv_heads * dim].view(rows, kv_heads, dim), kv[:, kv_heads * dim:].view(rows, kv_heads, dim)
    caches, expected = write_then_attend(g, num_blocks, kv_heads, block_size, q, k, v, blocks, offsets, tables, lens, window)
    got = torch.ops.ember_cpu.decode_attention_paired(q, *caches[1], k, v, blocks, offsets, tables, lens, window, 0.125)
    assert torch.equal(got, expected)
    assert torch.equal(caches[1][0], caches[0][0]) and torch.equal(caches[1][1], caches[0][1])
    before = caches[1][0].clone(), caches[1][1].clone()
    with pytest.raises(RuntimeError, match="is not the block table's position"):
        torch.ops.ember_cpu.decode_attention_paired(q, *caches[1], k, v, blocks, (offsets + 1) % block_size, tables,
                                                    lens, window, 0.125)
    assert torch.equal(caches[1][0], before[0]) and torch.equal(caches[1][1], before[1])


@pytest.mark.skipif(not bf16_pairs_supported(), reason="no AVX512-BF16 kernel here")
def test_decode_kernel_writes_first_when_another_row_reads_the_block():
    """The prefix cache shares a block as soon as a step fills it, so a one-token row admitted in that step
    can read the token another row writes into it: then every token goes in before any row is read (one
    thread: the longer row, B, is read first and would otherwise see the slot's stale contents)."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, block_size, num_blocks = 8, 4, 64, 16, 8
    tables = torch.tensor([[1, 2, 0, 0], [1, 2, 3, 4]])  # A fills block 2; B's context runs through it
    lens = torch.tensor([32, 60])
    blocks, offsets = torch.tensor([2, 4]), torch.tensor([15, 11])
    q = torch.randn(2, heads, dim, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, kv_heads, dim, generator=g).to(torch.bfloat16) for _ in range(2))
    caches, expected = write_then_attend(g, num_blocks, kv_heads, block_size, q, k, v, blocks, offsets, tables, lens, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = torch.ops.ember_cpu.decode_attention_paired(q, *caches[1], k, v, blocks, offsets, tables, lens, 0, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, expected)


@pytest.mark.skipif(not bf16_pairs_supported(), reason="no AVX512-BF16 kernel here")
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 2), (8, 1), (6, 2), (14, 2)])  # groups of 1-8 heads
@pytest.mark.parametrize("block_size,window", [(16, 0), (32, 0), (16, 20), (32, 37)])
@pytest.mark.parametrize("dim", [32, 80])  # the value tiles of 4 and of 1 vector of dims
def test_paired_invariant_tiling_gives_prompt_rows_their_decode_bits(heads, kv_heads, block_size, window, dim):
    """invariant=True: each row of a prompt chunk (over cached context, in tiles of rows) is the same bits as
    that row attended alone, as a decode is, and as inside chunks cut elsewhere; the fast tiling is not
    (it sums q.k in other chains and updates the softmax at other keys) but stays close."""
    g = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + block_size + window + dim)
    context, rows = 50, 37
    total = context + rows
    num_blocks = -(-total // block_size) + 2
    table = (torch.randperm(num_blocks - 1, generator=g)[:-(-total // block_size)] + 1).view(1, -1)
    positions = torch.arange(total)
    slots = table[0, positions // block_size] * block_size + positions % block_size
    kv_layout = KVLayout(paired=True, dtype=torch.bfloat16)
    cache = kv_layout.allocate(1, num_blocks, kv_heads, block_size, dim)[0]
    for part in cache:
        part.fill_(float("nan"))  # no unwritten slot may reach an output
    k, v = (torch.randn(total, kv_heads, dim, generator=g).to(torch.bfloat16) for _ in range(2))
    torch.ops.ember_cpu.write_paired(cache[0], cache[1], k, v, slots // block_size, slots % block_size)
    q = torch.randn(rows, heads, dim, generator=g).to(torch.bfloat16)
    lens = torch.arange(context + 1, total + 1)

    def attend(first, last, invariant=True):
        return torch.ops.ember_cpu.paged_attention(q[first:last], cache[0], cache[1], table, torch.zeros(last - first, dtype=torch.long),
                                                   lens[first:last].contiguous(), window, dim**-0.5, invariant=invariant)

    whole = attend(0, rows)
    assert not whole.isnan().any()
    alone = torch.cat([attend(i, i + 1) for i in range(rows)])
    assert torch.equal(whole, alone)
    assert torch.equal(whole, torch.cat([attend(0, 5), attend(5, 6), attend(6, 29), attend(29, rows)]))
    torch.testing.assert_close(attend(0, rows, invariant=False).float(), whole.float(), atol=2e-2, rtol=2e-2)
