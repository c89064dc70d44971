"""float32 matrix products on CPU through oneDNN, for training.

PyTorch multiplies float32 matrices on CPU with MKL, and MKL runs its AVX2 code on AMD CPUs: ~100 GFLOP/s
on one Zen 5 core, where oneDNN (also in every PyTorch build, used for its bf16 products) reaches ~230
on the same shapes (BENCHMARKS.md, "float32 products through oneDNN"). A training step is mostly such
products (forward, and two per weight in backward), so `linear` runs all three through oneDNN when
autograd records a float32 CPU product big enough to pay for oneDNN's ~10 us per call. The sums are
float32 in another order than MKL's (differences ~1e-6 relative).

Not used under autocast (which casts to 16 bits first), torch.compile (inductor picks its own kernels),
for tensor subclasses (DTensor) or without grad (the engine's float32 path keeps its products as they
were: its tests pin bits across batches).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MIN_MACS = 1 << 20  # multiply-adds per product below which MKL's lower call cost wins (BENCHMARKS.md)
WEIGHT_GRAD_SLICE = 1 << 19  # elements of each temporary when accumulating a weight gradient in slices (2 MiB)


@functools.cache
def available() -> bool:
    return torch.backends.mkldnn.is_available()


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32


def usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a @ b.T (a [M, K], b [N, K], float32 on CPU) goes through oneDNN."""
    return (_plain(a) and _plain(b) and a.shape[0] * a.shape[-1] * b.shape[0] >= MIN_MACS
            and not torch.compiler.is_compiling() and available() and torch.backends.mkldnn.enabled)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself if row- or column-major, else a row-major copy: oneDNN takes any strides but runs other
    layouts (a column slice of a wider matrix) through a reference kernel ~1000x slower (measured)."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def _onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.default(_dense(a), _dense(b), bias, "none", [], "")


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [N, K].T (+ bias) -> [M, N]."""
    return _onednn(a, b, bias) if usable(a, b) else F.linear(a, b, bias)


def matmul_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, N].T @ b [M, K] -> [N, K] (a weight's gradient from output gradients and inputs). oneDNN
    copies a transposed first operand into its own layout (MKL reads it in place), so the narrower of the
    two goes first: the copy is M x min(N, K) and the product runs faster that way too (BENCHMARKS.md)."""
    if not usable(a.t(), b.t()):
        return a.t() @ b
    (m, n), k = a.shape, b.shape[1]
    if n <= k or m * n <= n * k + m * k:  # (the other order also makes a contiguous copy of the result)
        return _onednn(a.t(), b.t())
    return _onednn(b.t(), a.t()).t().contiguous()


def slice_rows(columns: int, rows: int) -> int:
    """add_matmul_tn's slice of out's rows for out [*, columns] and a [rows, *]."""
    return max(1, WEIGHT_GRAD_SLICE // max(columns, rows))


def add_matmul_tn(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out [N, K] += a [M, N].T @ b [M, K], in slices of out's rows: oneDNN has no in-place add (MKL's addmm_
    is used where oneDNN is not), and each slice of a's columns is copied for it (`_dense`), so both of a
    slice's temporaries stay within WEIGHT_GRAD_SLICE elements (`slice_rows`)."""
    if not usable(a.t(), b.t()):
        out.addmm_(a.t(), b)
        return
    step = slice_rows(out.shape[1], a.shape[0])
    for start in range(0, out.shape[0], step):
        out[start:start + step] += _onednn(a[:, start:start + step].t(), b.t())


class _Linear(torch.autograd.Function):
    """F.linear for x [M, K] with every product through oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        need_x, need_weight, _ = ctx.needs_input_grad  # (as F.linear: only what the gradients need)
        ctx.save_for_backward(x if need_weight else None, weight if need_x else None)
        ctx.has_bias = bias is not None
        return matmul_nt(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_x = matmul_nt(grad, weight.t()) if need_x else None
        grad_weight = matmul_tn(grad, x) if need_weight else None
        grad_bias = grad.sum(0) if ctx.has_bias and need_bias else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear through oneDNN when autograd records a float32 CPU product worth it; None otherwise
    (the caller's own path)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return None
    flat = x.reshape(-1, x.shape[-1])
    if not usable(flat, weight) or (bias is not None and not _plain(bias)):
        return None
    out = _Linear.apply(flat, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])
