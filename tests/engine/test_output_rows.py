"""The last layer for the rows a step reads back (AttentionContext.output_rows): those rows' hidden states are
the same bits as when every row runs it (bf16, whose products are batch-invariant; fp32's products through
PyTorch may sum in another order for another row count), and every row's K/V still reaches the cache."""

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.attention import choose_layout, make_backend, resolve_backend
from ember.models import cpu_ops
from ember.models.loader import load_model
from tests.conftest import VOCAB
from tests.engine.test_attention_backends import random_layout, zeroed

# (architecture, dtype, attention backend, KV cache dtype, batch-invariant): the layer paths the engine takes --
# forward_cpu_rows (bf16 pair kernels), forward_rows (fp32, Qwen3's q/k norms), the modules' forward (Gemma 2's
# sandwich norms and soft-capping, Qwen2-MoE's experts) -- over the paired, transposed and reference attention,
# an int8 cache, Mistral's sliding window, and a non-invariant engine whose long chunks go to SDPA
CASES = [("llama", torch.bfloat16, "cpu_paged", "auto", True), ("llama", torch.bfloat16, "torch_paged", "auto", True),
         ("qwen3", torch.float32, "cpu_paged", "auto", True), ("gemma2", torch.float32, "torch_paged", "auto", True),
         ("qwen2_moe", torch.float32, "cpu_paged", "auto", True), ("mistral", torch.bfloat16, "cpu_paged", "int8", True),
         ("llama", torch.float32, "cpu_paged", "auto", False)]

# decodes, chunks over cached context, fresh prompts
QUERY_LENS, CONTEXT_LENS = [1, 1, 3, 17, 40], [9, 30, 12, 20, 0]


@pytest.mark.parametrize("arch,dtype,backend,kv_cache_dtype,invariant", CASES)
def test_output_rows_alone_are_the_same_bits_and_every_row_is_cached(model_factory, arch, dtype, backend,
                                                                     kv_cache_dtype, invariant):
    model, config = load_model(model_factory(arch, std=0.1), dtype)
    device = torch.device("cpu")
    shape = (config.num_heads, config.num_kv_heads, config.head_dim, 16)
    backend = resolve_backend(backend, device, shape) if backend == "torch_paged" else resolve_backend("auto", device, shape)
    layout = random_layout(QUERY_LENS, CONTEXT_LENS, 16, 64)
    rows = sum(QUERY_LENS)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (rows,), generator=g)
    keep = torch.tensor([0, 1, 4, 20, 21, 22, rows - 1])  # sampled rows and a few prompt-logprob rows
    kv_layout = choose_layout(backend, dtype, kv_cache_dtype, batch_invariant=invariant)

    def run(output_rows):
        caches = zeroed(kv_layout.allocate(config.num_layers, 64, config.num_kv_heads, 16, config.head_dim, device))
        layout.output_rows = output_rows
        ctx = make_backend(backend, caches, 16, kv_layout, batch_invariant=invariant).build(layout)
        with torch.inference_mode(), cpu_ops.batch_invariance(invariant):
            return model(ids, layout.positions, ctx), caches

    every, every_caches = run(None)
    some, some_caches = run(keep)
    assert every.shape[0] == rows and some.shape[0] == len(keep)
    if dtype == torch.bfloat16 and invariant:
        assert torch.equal(some, every[keep])
    else:
        torch.testing.assert_close(some, every[keep], rtol=1e-5, atol=1e-5)
    for a, b in zip(every_caches, some_caches):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_prompt_logprobs_and_sampled_tokens_unchanged_with_a_pruned_last_layer(model_factory):
    """Through the engine: prompt logprobs (every prompt row read back) beside requests whose prompt rows are
    not, chunked over steps; each request's outputs equal those it gets alone."""
    path = str(model_factory("llama", std=0.1))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (70, 5, 33)]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=2),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=1)]
    llm = LLM(path, dtype="bfloat16", max_num_batched_tokens=32, enable_prefix_caching=False)

    def result(out):
        o = out.outputs[0]
        prompt = [None if step is None else {t: (lp.logprob, lp.rank) for t, lp in step.items()}
                  for step in out.prompt_logprobs or []]
        return o.token_ids, [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in o.logprobs], prompt

    together = [result(o) for o in llm.generate(prompts, params, use_tqdm=False)]
    for prompt, p, expected in zip(prompts, params, together):
        assert result(llm.generate([prompt], p, use_tqdm=False)[0]) == expected
    assert len(together[0][2]) == 70 and together[0][2][0] is None
