"""ember's CPU kernels (GEMV, RMSNorm, SwiGLU, rotary, argmax) against plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from ember.models import cpu_ops

needs_kernels = pytest.mark.skipif(not cpu_ops.gemv_available(), reason="no AVX512-BF16/VNNI kernels here")
needs_fp32_kernels = pytest.mark.skipif(not cpu_ops.elementwise_available(torch.float32),
                                        reason="no AVX-512 (VNNI) kernels here")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 32), (7, 70), (100, 128), (300, 896), (33, 4160)])
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 13, 32, 97])
def test_gemv_kernels_match_plain_pytorch(n, k, rows):
    g = torch.Generator().manual_seed(n * k + rows)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        got = cpu_ops.linear(x, w, bias)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        expected = torch.nn.functional.linear(x.float(), w.float(), bias.float())
        assert relative_error(got, expected) < 5e-3
        # both small-batch kernels, whichever `linear` picked for this row count
        assert relative_error(torch.ops.ember_ops.linear_gemv(x, w, None, bias), expected) < 5e-3
        if k % 2 == 0:
            pairs = torch.ops.ember_ops.pack_pairs(w)
            assert relative_error(torch.ops.ember_ops.linear_pairs(x, pairs, n, bias), expected) < 5e-3
        if rows > cpu_ops.INT8_GEMV_MAX_ROWS:
            return
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scales = torch.rand(n, generator=g) / 100
        got8 = cpu_ops.int8_linear(x, q, scales, bias)
        expected8 = torch.nn.functional.linear(x.float(), q.float() * scales[:, None], bias.float())
        assert relative_error(got8, expected8) < 5e-3


@needs_kernels
def test_pair_packed_products_do_not_depend_on_the_batch():
    """Each row's result is the same bits whichever tile (and however many rows) it was computed in,
    so a request's logits do not change with what else is in the batch; every block-group size
    (1-4 blocks of 16 channels) and every tile height (1-6 rows) is exercised."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(131, 96, generator=g).to(torch.bfloat16)
    for n in (16, 48, 64, 300, 1000):
        w = torch.randn(n, 96, generator=g).to(torch.bfloat16)
        bias = torch.randn(n, generator=g).to(torch.bfloat16)
        pairs = torch.ops.ember_ops.pack_pairs(w)
        full = torch.ops.ember_ops.linear_pairs(x, pairs, n, bias)
        for rows in (3, 4, 5, 7, 11, 64):
            assert torch.equal(torch.ops.ember_ops.linear_pairs(x[-rows:].contiguous(), pairs, n, bias), full[-rows:])
        expected = torch.nn.functional.linear(x.float(), w.float(), bias.float())
        assert relative_error(full, expected) < 5e-3


@pytest.mark.skipif(not cpu_ops.avx2_library_available(), reason="needs AVX2 + FMA and a C++ compiler")
@pytest.mark.parametrize("n,k", [(1, 8), (7, 70), (100, 128), (300, 896), (33, 4160), (1000, 96)])
def test_avx2_block_products_match_pytorch_and_do_not_depend_on_the_batch(n, k):
    """Every tile height (1-5 rows), the single-row tile of up to 4 groups of 16 channels, row chunks and channel tails."""
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(203, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    blocks = torch.ops.ember_avx2.pack_blocks(w)
    full = torch.ops.ember_avx2.linear_blocks(x, blocks, n, bias)
    assert relative_error(full, F.linear(x.float(), w.float(), bias.float())) < 5e-3
    for rows in (1, 2, 3, 5, 7, 64, 130):
        assert torch.equal(torch.ops.ember_avx2.linear_blocks(x[-rows:].contiguous(), blocks, n, bias), full[-rows:])
    assert torch.equal(torch.ops.ember_avx2.linear_blocks(x[:1], blocks, n, None),
                       torch.ops.ember_avx2.linear_blocks(x[:5], blocks, n, None)[:1])


@pytest.mark.skipif(not cpu_ops.avx2_library_available(), reason="needs AVX2 + FMA and a C++ compiler")
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_avx2_norm_and_swiglu_kernels_keep_the_arithmetic(rows):
    """SwiGLU to the bit of F.silu(gate) * up; add + RMSNorm = the add, then the norm; the norm as transformers'."""
    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 203, generator=g) * 4).to(torch.bfloat16)  # 203: a partial vector at the end
    x, delta = torch.randn(2, rows, 203, generator=g).to(torch.bfloat16)
    weight = torch.rand(203, generator=g).to(torch.bfloat16)
    ops = torch.ops.ember_avx2  # called directly: on AVX512-BF16 CPUs the engine routes to cpu_ops.cpp's instead
    with torch.inference_mode():
        assert torch.equal(ops.silu_mul(gate_up), F.silu(gate_up[:, :203]) * gate_up[:, 203:])
        total, normed = ops.add_rms_norm(x, delta, weight, 1e-6)
        assert torch.equal(total, x + delta) and torch.equal(normed, ops.rms_norm(x + delta, weight, 1e-6))
    hidden = (x + delta).float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = weight * hidden.to(torch.bfloat16)
    assert (normed != expected).float().mean().item() < 0.01  # last-bit differences from the sum's order only


def test_gemv_is_not_used_under_autograd():
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16, requires_grad=True)
    out = cpu_ops.linear(x, layer.weight, layer.bias)
    out.sum().backward()  # F.linear's autograd, not the kernel's (which has none)
    assert x.grad is not None


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 64), (3, 896), (5, 7, 100), (2, 1000)])
def test_rms_norm_matches_transformers_arithmetic(shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(torch.bfloat16)
    weight = (torch.rand(shape[-1], generator=g) + 0.5).to(torch.bfloat16)
    with torch.inference_mode():
        got = cpu_ops.rms_norm(x, weight, 1e-6)
    # LlamaRMSNorm.forward: fp32 statistics, normalised value rounded to bf16, then times the weight
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = weight * hidden.to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    mismatched = (got != expected).float().mean().item()
    assert mismatched < 0.01  # last-bit differences from the order of the sum of squares only
    torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=1e-6)


@pytest.mark.skipif(not cpu_ops._onednn_packing(), reason="no oneDNN weight prepacking here")
def test_prepacked_weights_are_exact_and_follow_in_place_updates():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(96, 64).to(torch.bfloat16))
    stacked = torch.nn.Parameter(torch.randn(3, 48, 64).to(torch.bfloat16))
    x = torch.randn(cpu_ops.PAIRS_MAX_ROWS + 8, 64).to(torch.bfloat16)  # oneDNN's prepacked path
    few = torch.randn(12, 64).to(torch.bfloat16)  # ember's pair-packed copy (where the kernels exist)

    def check():
        if cpu_ops.blocks_available():  # AVX2's block kernel takes every row count: close, not the same bits
            assert relative_error(cpu_ops.linear(x, weight, None), torch.nn.functional.linear(x.float(), weight.float())) < 5e-3
        else:
            assert torch.equal(cpu_ops.linear(x, weight, None), torch.nn.functional.linear(x, weight))
            assert torch.equal(cpu_ops.expert_linear(x, stacked, 1), torch.nn.functional.linear(x, stacked[1]))
        exact = torch.nn.functional.linear(few.float(), weight.float())
        assert relative_error(cpu_ops.linear(few, weight, None), exact) < 5e-3
        exact = torch.nn.functional.linear(few.float(), stacked[1].float())
        assert relative_error(cpu_ops.expert_linear(few, stacked, 1), exact) < 5e-3

    with torch.no_grad():
        check()
        weight[:10].copy_(torch.randn(10, 64))  # an RL weight push writes slices in place
        stacked[1].mul_(2)
        check()
    out = cpu_ops.linear(x, weight, None)  # with autograd: plain F.linear, and gradients flow
    out.float().sum().backward()
    assert weight.grad is not None


@needs_kernels
@pytest.mark.parametrize("inter,k", [(32, 96), (1408, 512)])
def test_swiglu_product_is_the_product_then_silu_mul_to_the_bit(inter, k):
    """linear_pairs_silu (silu(gate) * up written from the gate_up product's tiles) gives linear_pairs
    followed by silu_mul, bit for bit, at every tile height, with and without a bias; widths that
    pack_pairs_swiglu cannot group are refused by name."""
    g = torch.Generator().manual_seed(inter)
    w = (torch.randn(2 * inter, k, generator=g) * 0.05).to(torch.bfloat16)
    bias = (torch.randn(2 * inter, generator=g) * 0.5).to(torch.bfloat16)
    ops = torch.ops.ember_ops
    pairs, swiglu = ops.pack_pairs(w), ops.pack_pairs_swiglu(w)
    for rows in (1, 2, 5, 6, 7, 64, 131):
        x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
        for b in (None, bias):
            expected = ops.silu_mul(ops.linear_pairs(x, pairs, 2 * inter, b))
            assert torch.equal(ops.linear_pairs_silu(x, swiglu, inter, b), expected)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.linear_pairs_silu(x, swiglu, inter + 16, None)
    assert cpu_ops._swiglu_pairs(torch.zeros(2 * 48, k, dtype=torch.bfloat16)) is None  # I = 48: not groupable


@needs_kernels
def test_swiglu_gives_torchs_bits_for_every_bf16_gate():
    """silu(gate) comes from a table of all 65,536 bf16 values (cpu_ops.cpp's SiluTable): every one of them,
    infinities and NaNs included, against F.silu(gate) * up; subnormals count as zero (AVX512-BF16's
    rounding instruction flushes them, in every ember bf16 kernel, so values at that edge may differ)."""
    gate = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)
    up = (torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    with torch.inference_mode():
        out = torch.ops.ember_ops.silu_mul(torch.cat((gate, up), dim=1))
    expected = F.silu(gate) * up
    tiny = torch.finfo(torch.bfloat16).tiny
    flushed = (torch.stack((gate, F.silu(gate), expected)).float().abs() < 4 * tiny).any(0)  # at the edge
    assert ((out == expected) | (out == 0))[flushed].all()
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    same = ~nan & ~flushed
    assert torch.equal(out.view(torch.int16)[same], expected.view(torch.int16)[same])


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_elementwise_kernels_are_bit_exact(rows):
    """SwiGLU, rotary, residual add + RMSNorm and argmax in one pass each give the separate ops' bf16
    results to the bit."""
    from ember.models.layers import apply_rotary

    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 200, generator=g) * 4).to(torch.bfloat16)  # 200: a partial vector at the end
    assert torch.equal(cpu_ops.silu_mul(gate_up), F.silu(gate_up[:, :200]) * gate_up[:, 200:])

    heads, kv_heads, dim = 6, 2, 64
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g).to(torch.bfloat16)
    angles = torch.arange(rows)[:, None] * 0.37 * torch.rand(dim // 2, generator=g)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    rotated = (heads + kv_heads) * dim
    expected = apply_rotary(qkv[:, :rotated].unflatten(-1, (heads + kv_heads, dim)), cos, sin).flatten(-2)
    untouched = qkv[:, rotated:].clone()
    assert cpu_ops.rotary_(qkv, cos, sin, heads + kv_heads)
    assert torch.equal(qkv[:, :rotated], expected) and torch.equal(qkv[:, rotated:], untouched)

    x, delta = torch.randn(2, rows, 200, generator=g).to(torch.bfloat16)
    weight = torch.rand(200, generator=g).to(torch.bfloat16)
    total, normed = cpu_ops.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta) and torch.equal(normed, cpu_ops.rms_norm(x + delta, weight, 1e-6))

    logits = torch.randn(rows, 1000, generator=g).to(torch.bfloat16)
    logits[0, 7] = logits[0, 900] = 50  # ties: the first wins
    if rows > 1:
        logits[1, 11] = float("nan")  # NaN: above everything, as torch.argmax has it
    assert torch.equal(cpu_ops.argmax(logits), logits.float().argmax(dim=-1))


@needs_fp32_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 15, 64, 100, 1000, 32000])
def test_argmax_keeps_the_first_maximum_across_its_parallel_sums(dtype, width):
    """The kernel keeps four (max, index) pairs over interleaved vectors: a tie between them, the
    masked tail, NaN and rows of -inf must still give torch.argmax's index."""
    if dtype == torch.bfloat16 and not cpu_ops.gemv_available():
        pytest.skip("no AVX512-BF16 kernels here")
    g = torch.Generator().manual_seed(width)
    logits = torch.randn(6, width, generator=g)
    if width > 70:
        logits[0, 70] = logits[0, 20] = 9.0  # 70 sits in the first pair, 20 in the second: 20 comes first
        logits[1, 40] = logits[1, 30] = 9.0  # the same pair, the same lane block
        logits[2, width - 1] = logits[2, 5] = 9.0  # the tail against the first vector
        logits[3, width - 1] = 9.0  # the maximum in the masked tail alone
    logits[4] = float("-inf")
    logits[5, width // 2] = float("nan")
    logits = logits.to(dtype)
    assert torch.equal(cpu_ops.argmax(logits), logits.float().argmax(dim=-1))


def test_elementwise_kernels_step_aside_for_autograd():
    x = torch.randn(2, 8, requires_grad=True)
    assert cpu_ops.silu_mul(x) is None and cpu_ops.argmax(x) is None
    assert not cpu_ops.rotary_(x, torch.ones(2, 4), torch.zeros(2, 4), 1)
    total, normed = cpu_ops.add_rms_norm(x, x, torch.ones(8), 1e-6)
    (total.sum() + normed.sum()).backward()  # PyTorch's ops, with their autograd
    assert x.grad is not None


@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_layer_row_path_matches_the_module_path(model_factory, arch, monkeypatch):
    """The engine's bf16 batches go through DecoderLayer.forward_cpu_rows (one Python frame a layer,
    the residual add fused into the next norm), decode-only steps through decode_stack (one C++ call for
    all layers); every logprob equals the module path's to the bit, over prompt chunks, decodes and their
    mixtures (qkv bias in Qwen2, a sliding window in Mistral)."""
    from ember import LLM, SamplingParams
    from ember.models import llama

    llm = LLM(str(model_factory(arch)), dtype="bfloat16", max_num_batched_tokens=64)
    prompts = [[(7 * i + j) % 400 + 3 for j in range(n)] for i, n in enumerate([5, 40, 90, 17, 3, 61])]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    deltas = []  # forward_cpu_rows returns delta None only when it falls back to forward()
    row_path = llama.DecoderLayer.forward_cpu_rows
    monkeypatch.setattr(llama.DecoderLayer, "forward_cpu_rows",
                        lambda self, *a: (out := row_path(self, *a), deltas.append(out[1] is not None))[0])
    stacked = []
    stack = llama.LlamaModel._decode_stack
    monkeypatch.setattr(llama.LlamaModel, "_decode_stack",
                        lambda self, *a: (out := stack(self, *a), stacked.append(out is not None))[0])
    fast = llm.generate(prompts, params, use_tqdm=False)
    assert deltas and all(deltas), "the row path was not taken, or fell back"
    assert sum(stacked) >= 10, "decode steps did not go through decode_stack"
    monkeypatch.setattr(llama.LlamaModel, "_cpu_rows", lambda self, x: None)
    monkeypatch.setattr(llama.LlamaModel, "_rows", lambda self, x: None)
    llm.engine.kv.reset_prefix_cache()
    plain = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(fast, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs + a.prompt_logprobs[1:], b.outputs[0].logprobs + b.prompt_logprobs[1:]):
            assert {t: x.logprob for t, x in la.items()} == {t: x.logprob for t, x in lb.items()}


@needs_fp32_kernels
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_fp32_elementwise_kernels_match_pytorch(rows):
    """The fp32 RMSNorm (+ residual add), SwiGLU, rotary and argmax kernels (quantized GGUF models compute in
    fp32) against PyTorch's ops, to fp32 rounding (their sums run in another order)."""
    from ember.models.layers import apply_rotary

    g = torch.Generator().manual_seed(rows)
    x, delta, w = torch.randn(rows, 576, generator=g), torch.randn(rows, 576, generator=g), torch.randn(576, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)
        total, normed = cpu_ops.add_rms_norm(x, delta, w, 1e-5)
        assert torch.equal(total, x + delta)
        torch.testing.assert_close(normed, F.rms_norm(x + delta, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)
        gate_up = torch.randn(rows, 2 * 1536, generator=g)
        torch.testing.assert_close(cpu_ops.silu_mul(gate_up), F.silu(gate_up[:, :1536]) * gate_up[:, 1536:])
        qkv = torch.randn(rows, 15 * 64, generator=g)
        angles = torch.randn(rows, 32, generator=g)
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        expected = apply_rotary(qkv[:, :12 * 64].unflatten(-1, (12, 64)), cos, sin).flatten(-2)
        rotated = qkv.clone()
        assert cpu_ops.rotary_(rotated, cos, sin, 12)
        torch.testing.assert_close(rotated[:, :12 * 64], expected)
        assert torch.equal(rotated[:, 12 * 64:], qkv[:, 12 * 64:])  # v untouched
        logits = torch.randn(rows, 49152, generator=g)
        logits[0, 7] = logits[0, 900] = 50  # ties: the first wins
        if rows > 1:
            logits[1, 11] = float("nan")  # NaN above everything, as torch.argmax has it
        assert torch.equal(cpu_ops.argmax(logits), logits.argmax(dim=-1))


@needs_fp32_kernels
@pytest.mark.parametrize("arch,quantization", [("qwen2", None), ("qwen2", "int4"), ("qwen2", "int8"), ("qwen3", None)])
def test_rows_path_matches_the_module_path(model_factory, arch, quantization, monkeypatch):
    """fp32 engine batches (dense, or quantized as a GGUF's are; Qwen3's per-head q/k norms) go through
    DecoderLayer.forward_rows: the same kernels in the same order with one Python frame a layer, so every
    logprob equals the module path's."""
    from ember import LLM, SamplingParams
    from ember.models import llama

    llm = LLM(str(model_factory(arch)), dtype="float32", max_num_batched_tokens=64, quantization=quantization)
    prompts = [[(7 * i + j) % 400 + 3 for j in range(n)] for i, n in enumerate([5, 40, 90, 17, 3])]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    taken = []
    rows_path = llama.DecoderLayer.forward_rows
    monkeypatch.setattr(llama.DecoderLayer, "forward_rows", lambda self, *a: (taken.append(1), rows_path(self, *a))[1])
    fast = llm.generate(prompts, params, use_tqdm=False)
    assert taken, "the rows path was not taken"
    monkeypatch.setattr(llama.LlamaModel, "_rows", lambda self, x: None)
    llm.engine.kv.reset_prefix_cache()
    plain = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(fast, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs + a.prompt_logprobs[1:], b.outputs[0].logprobs + b.prompt_logprobs[1:]):
            assert {t: x.logprob for t, x in la.items()} == {t: x.logprob for t, x in lb.items()}
