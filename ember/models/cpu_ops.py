"""bf16 work on CPU through `cpu_ops.cpp`: matrix products (from one row to prompt chunks), RMSNorm
and the other elementwise steps of a decoder layer.

A decode step multiplies a handful of rows by every weight matrix, which PyTorch runs
at a fraction of the memory bandwidth (one or two rows) or of the bf16 peak (a few dozen)
here. One or two rows go through a GEMV that streams each weight as stored; 3 to
`PAIRS_MAX_ROWS` rows (decode batches and prompt chunks alike) through a kernel that reads a
pair-packed copy of the weight in tiles of 6 rows x 64 channels (see `_pairs`); it ran ahead
of or level with oneDNN's prepacked GEMM from 16 to 2,048 rows here (BENCHMARKS.md has the
measurements behind both limits). RMSNorm, SwiGLU's silu(gate) * up, rotary embedding and greedy argmax in bf16 are
one pass each instead of PyTorch's several ops, with the same rounding. Used only for bf16
activations on CPUs with AVX512-BF16 and VNNI, without autograd, outside torch.compile (a compiled
region, `compile: true` training, traces PyTorch's ops and inductor fuses them); everything else goes
through PyTorch. Larger bf16 products without autograd use oneDNN with the weight
prepacked once (see `_packed`).

Batch invariance (`set_batch_invariant`, the engine's default): each of those kernels sums a row's
products in an order that does not depend on the other rows, but they differ from each other, so
choosing by row count would make a row's bits depend on its batch. Invariant, a weight always goes
through one kernel: the pair-packed one (any number of rows) where it can, else the GEMV.

CPUs with AVX2 but without AVX512-BF16 (most laptops) get `avx2_ops.cpp` instead: a bf16 GEMM for any
number of rows (`_blocks`: one more copy of each weight, as `_pairs` is) and one-pass RMSNorm and
SwiGLU with the same arithmetic as the AVX-512 ones; PyTorch's own bf16 products there run at a
fraction of its fp32 speed. tests/engine/test_batch_invariance.py checks row independence on
whichever CPU runs it.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from ember.models import fp32_matmul
from ember.models.cpu_build import build
from ember.models.huge_pages import huge_page_copy

GEMV_MAX_ROWS = 2  # bf16 weights: row by row on the weight as stored
PAIRS_MAX_ROWS = 2048  # bf16 weights: the pair-packed kernel up to here (as far as measured); oneDNN's above
INT8_GEMV_MAX_ROWS = 16  # int8 weights: above this dequantizing once + GEMM wins
_batch_invariant = False  # process-wide, set by the engine (EngineConfig.batch_invariant)


def set_batch_invariant(enabled: bool) -> None:
    """Route bf16 products by the weight alone, never by the number of rows (see the module's note)."""
    global _batch_invariant
    _batch_invariant = bool(enabled)


def batch_invariant_routing() -> bool:
    return _batch_invariant


@contextlib.contextmanager
def batch_invariance(enabled: bool):
    """The setting for one engine step, restored after it: other callers in the process (a trainer's
    no-grad forward, another engine) keep their own routing."""
    before = _batch_invariant
    set_batch_invariant(enabled)
    try:
        yield
    finally:
        set_batch_invariant(before)


@functools.cache
def _library() -> bool:
    return build("ember_cpu_ops", str(Path(__file__).with_name("cpu_ops.cpp")))


@functools.cache
def gemv_available() -> bool:
    """The bf16 kernels (AVX512-BF16)."""
    return _library() and bool(torch.ops.ember_ops.gemv_supported())


@functools.cache
def int_kernels_available() -> bool:
    """The integer-weight kernels (AVX512-VNNI; fp32 or bf16 activations)."""
    return _library() and bool(torch.ops.ember_ops.int_gemv_supported())


def int_kernel_ok(x: torch.Tensor, max_rows: int) -> bool:
    """Whether x (fp32 or bf16 on CPU, at most `max_rows` rows, no gradient) can go through them."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.numel() <= max_rows * x.shape[-1] and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling() and int_kernels_available())


@functools.cache
def avx2_library_available() -> bool:
    """avx2_ops.cpp built and the CPU has AVX2 + FMA (true on AVX-512 CPUs too: the tests run it there)."""
    return build("ember_avx2_ops", str(Path(__file__).with_name("avx2_ops.cpp"))) and bool(torch.ops.ember_avx2.supported())


@functools.cache
def blocks_available() -> bool:
    """Whether the engine uses the AVX2 bf16 kernel: CPUs with AVX2 but without AVX512-BF16."""
    return not gemv_available() and avx2_library_available()


def _gemv(x, weight, scales, bias):  # the op's resolved overload: no overload lookup on every call
    return torch.ops.ember_ops.linear_gemv.default(x, weight, scales, bias)


def elementwise_available(dtype: torch.dtype) -> bool:
    """The fused RMSNorm / SwiGLU / rotary kernels for activations of `dtype`."""
    return (dtype == torch.bfloat16 and gemv_available()) or (dtype == torch.float32 and int_kernels_available())


def _elementwise_ok(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether the fused elementwise kernels apply: bf16 (AVX512-BF16 builds) or fp32 (AVX-512F),
    on CPU, with no gradient to track."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)):
        return False
    if torch.compiler.is_compiling():  # (`compile: true` training: inductor fuses PyTorch's ops itself)
        return False
    return gemv_available() if x.dtype == torch.bfloat16 else int_kernels_available()


def _inference_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16 on CPU with no gradient to track: where ember's paths apply."""
    return weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.device.type == "cpu" and \
        not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and not torch.compiler.is_compiling()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear: bf16 inference on CPU through ember's GEMV (1-2 rows), its pair-packed kernel (up to
    `PAIRS_MAX_ROWS`; any number when batch-invariant) or oneDNN with a prepacked weight (more rows)."""
    if not _inference_bf16(x, weight):
        out = fp32_matmul.linear(x, weight, bias)  # training in float32
        return F.linear(x, weight, bias) if out is None else out
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (the engine's rows are flat already)
    rows = flat.shape[0]
    if gemv_available() and (_batch_invariant or rows <= PAIRS_MAX_ROWS):
        flat = flat if flat.is_contiguous() else flat.contiguous()
        pairs = None if rows <= GEMV_MAX_ROWS and not _batch_invariant else _pairs(weight)
        if pairs is None:
            out = _gemv(flat, weight, None, bias)
        else:
            out = torch.ops.ember_ops.linear_pairs.default(flat, pairs, weight.shape[0], bias)
    elif blocks_available() and (blocks := _blocks(weight)) is not None:
        out = torch.ops.ember_avx2.linear_blocks.default(flat, blocks, weight.shape[0], bias)
    elif (packed := _packed(weight)) is not None:
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    else:
        return F.linear(x, weight, bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


def expert_linear(x: torch.Tensor, stacked: torch.Tensor, expert: int) -> torch.Tensor:
    """F.linear(x, stacked[expert]) for MoE weights stacked [experts, out, in], on the same paths."""
    if not _inference_bf16(x, stacked):
        out = fp32_matmul.linear(x, stacked[expert], None)  # training in float32
        return F.linear(x, stacked[expert]) if out is None else out
    if (_batch_invariant or x.shape[0] <= PAIRS_MAX_ROWS) and gemv_available():
        if (x.shape[0] <= GEMV_MAX_ROWS and not _batch_invariant) or (pairs := _pairs(stacked)) is None:
            return _gemv(x.contiguous(), stacked[expert], None, None)
        return torch.ops.ember_ops.linear_pairs.default(x.contiguous(), pairs[expert], stacked.shape[1], None)
    if blocks_available() and (blocks := _blocks(stacked)) is not None:
        return torch.ops.ember_avx2.linear_blocks.default(x.contiguous(), blocks[expert], stacked.shape[1], None)
    if (packed := _packed(stacked)) is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed[expert], None, "none", [], "")
    return F.linear(x, stacked[expert])


def _kept_copy(weight: torch.Tensor, name: str, pack, usable: bool):
    """A repacked copy of `weight` (one per expert for stacked [experts, out, in] weights), built on
    first use, kept on the weight as `name` and rebuilt whenever the weight changes in place (e.g. an
    RL weight push). None where `usable` is false or the weight is an inference tensor (a temporary:
    nothing to keep it for)."""
    cached = getattr(weight, name, None)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    if not usable or weight.is_inference():
        return None
    plain = weight.detach()
    packed = pack(plain) if plain.dim() == 2 else [pack(w) for w in plain]
    setattr(weight, name, (weight._version, packed))
    return packed


def _packed(weight: torch.Tensor):
    """The weight reordered once into oneDNN's blocked layout (what F.linear redoes on every call):
    faster products at decode batch sizes (BENCHMARKS.md), bit-identical results; a second copy of it."""
    return _kept_copy(weight, "_ember_packed", lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 64),
                      _onednn_packing())


def _pairs(weight: torch.Tensor):
    """The weight in the pair-packed layout of ember's kernel ([N/64, K/2, 64, 2], see cpu_ops.cpp), in
    huge pages: one more copy, built on the first batch of 3 rows or more. None if K is odd."""
    return _kept_copy(weight, "_ember_pairs", lambda w: huge_page_copy(torch.ops.ember_ops.pack_pairs(w)),
                      weight.shape[-1] % 2 == 0)


def _swiglu_pairs(weight: torch.Tensor):
    """A SwiGLU gate_up weight ([2I, K]: gate rows, then up rows) pair-packed for linear_pairs_silu, which
    writes silu(gate) * up straight from the product (cpu_ops.cpp: pack_pairs_swiglu): instead of, not
    besides, `_pairs(weight)` on the engine's paths. None unless I is a multiple of 32 and K even."""
    return _kept_copy(weight, "_ember_swiglu", lambda w: huge_page_copy(torch.ops.ember_ops.pack_pairs_swiglu(w)),
                      weight.dim() == 2 and weight.shape[0] % 64 == 0 and weight.shape[1] % 2 == 0)


def _blocks(weight: torch.Tensor):
    """The weight in the block layout of the AVX2 kernel ([N/16, K, 16], see avx2_ops.cpp), in huge pages."""
    return _kept_copy(weight, "_ember_blocks", lambda w: huge_page_copy(torch.ops.ember_avx2.pack_blocks(w)), True)


@functools.cache
def _onednn_packing() -> bool:
    try:
        w = torch.randn(16, 32).to(torch.bfloat16)
        x = torch.randn(3, 32).to(torch.bfloat16)
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 64), None, "none", [], "")
        return torch.backends.mkldnn.is_available() and torch.equal(got, F.linear(x, w))
    except (AttributeError, RuntimeError):
        return False


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                max_rows: int = INT8_GEMV_MAX_ROWS) -> torch.Tensor | None:
    """x @ (q * scales).T + bias for int8 q and fp32 scales, or None where the kernel does not apply."""
    if not int_kernel_ok(x, max_rows):
        return None
    out = torch.ops.ember_ops.linear_gemv(x.reshape(-1, x.shape[-1]).contiguous(), q, scales, bias)
    return out.view(*x.shape[:-1], q.shape[0])


def _norm_ops(x: torch.Tensor, *tensors: torch.Tensor | None):
    """The op library with one-pass RMSNorm and SwiGLU for x, or None: AVX512-BF16's (cpu_ops.cpp) or, for
    bf16 on CPUs without it, AVX2's (avx2_ops.cpp: the same arithmetic)."""
    if _elementwise_ok(x, *tensors):
        return torch.ops.ember_ops
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.compiler.is_compiling() and \
            not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors))) and \
            blocks_available():
        return torch.ops.ember_avx2
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (fp32 statistics, rounded to the input dtype before the weight)."""
    if weight.dtype != x.dtype or (ops := _norm_ops(x, weight)) is None:
        return F.rms_norm(x, weight.shape, weight, eps)
    return ops.rms_norm.default(x.contiguous(), weight.contiguous(), eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): a residual add and the norm after it, in one pass in bf16."""
    if weight.dtype != x.dtype or delta.dtype != x.dtype or x.shape != delta.shape or \
            (ops := _norm_ops(x, weight, delta)) is None:
        total = x + delta
        return total, rms_norm(total, weight, eps)
    return ops.add_rms_norm.default(x.contiguous(), delta.contiguous(), weight.contiguous(), eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for [..., 2 * I] = gate | up, or None where the kernel does not apply."""
    if (ops := _norm_ops(gate_up)) is None:
        return None
    return ops.silu_mul(gate_up.contiguous())


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> bool:
    """Rotate the first `heads` heads of each row of x [tokens, width] in place (the q|k part of
    a fused qkv output); False, untouched, where the kernel does not apply."""
    if x.dim() != 2 or x.stride(1) != 1 or cos.dtype != x.dtype or not _elementwise_ok(x):
        return False
    torch.ops.ember_ops.rotary_(x, cos.contiguous(), sin.contiguous(), heads)
    return True


def argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """Each row's argmax for bf16 or fp32 logits [rows, vocab] (torch.argmax's ties and NaNs), or None."""
    if logits.dim() != 2 or not _elementwise_ok(logits):
        return None
    return torch.ops.ember_ops.argmax.default(logits.contiguous())
