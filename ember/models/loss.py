"""Next-token log-probabilities for training without the full [tokens, vocab] logits in memory.

The LM head and the log-softmax run over a bounded number of rows at a time, only for the positions
that have a label, so a step holds at most one chunk's logits and their gradient: with a 152k
vocabulary (Qwen2) and 4,096 tokens that is ~64 MiB instead of ~2.5 GiB of float32 logits (and as
much again for their gradient).

Two ways to get the gradients without keeping the logits:
- `token_logprobs` (per-token results, e.g. DPO's per-sequence sums): each chunk is recomputed in
  backward (activation checkpointing): the head's product runs 4 times per chunk (forward, recompute,
  two in backward), its logsumexp twice and its softmax once (in backward, in one buffer).
- `token_logprob_sum` (a plain LM loss: every label weighs the same): the sum's gradient with respect to
  the hidden states and the head's weight is known in forward, up to one scalar factor, so each chunk
  computes it there (d sum / d logits = onehot - softmax) and backward only scales it: 3 products, one
  softmax, no recompute (the fused linear cross-entropy of Liger-Kernel and Apple's cut-cross-entropy).
  It costs one fp32 [vocab, hidden] buffer (the head weight's gradient) from forward to backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ember.models import fp32_matmul

CHUNK_LOGITS = 1 << 24  # logits per chunk (64 MiB in float32)


def _chunk_logprobs(hidden: torch.Tensor, labels: torch.Tensor, compute_logits: Callable) -> torch.Tensor:
    return _LabelLogprob.apply(compute_logits(hidden).float(), labels)


class _LabelLogprob(torch.autograd.Function):
    """log_softmax(logits)[row, label] for float32 logits [n, vocab] -> [n]. Keeps only the logits it was
    given for backward, which makes one [n, vocab] buffer (F.cross_entropy keeps its log-softmax output
    besides, and its backward makes two more: a chunk's peak was ~4 buffers, now 2)."""

    @staticmethod
    def forward(ctx, logits, labels):
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, labels, lse)
        return logits.gather(1, labels[:, None]).squeeze(1) - lse

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        grad_logits = torch.sub(logits, lse[:, None]).exp_().mul_(-grad[:, None])  # -softmax * grad
        grad_logits[torch.arange(len(labels), device=labels.device), labels] += grad
        return grad_logits, None


def _chunk_rows(vocab_size: int, chunk_logits: int | None) -> int:
    return max(1, (chunk_logits or CHUNK_LOGITS) // vocab_size)


def token_logprobs(hidden: torch.Tensor, labels: torch.Tensor, compute_logits: Callable, vocab_size: int,
                   chunk_logits: int | None = None) -> torch.Tensor:
    """log p(labels[b, t] | hidden[b, t]) as float32 [B, T]; 0 where the label is -100 (not trained on)."""
    flat_hidden, flat_labels = hidden.flatten(0, -2), labels.flatten()
    rows = (flat_labels != -100).nonzero().squeeze(1)
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device)
    step = _chunk_rows(vocab_size, chunk_logits)
    parts = []
    for start in range(0, len(rows), step):
        index = rows[start:start + step]
        h, y = flat_hidden[index], flat_labels[index]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_logprobs, h, y, compute_logits, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(h, y, compute_logits))
    if parts:
        out = out.index_put((rows,), torch.cat(parts))
    elif torch.is_grad_enabled() and hidden.requires_grad:
        # No label here (a context-parallel rank's slice of a padded sequence): a zero-row pass through the
        # head keeps the result a function of every parameter, so this rank's backward produces (zero)
        # gradients for the same parameters, with the same collectives, as every other rank's.
        out = out + compute_logits(flat_hidden[:0]).sum()
    return out.view(labels.shape)


def token_logprob_sum(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, softcap: float | None,
                      compute_logits: Callable, vocab_size: int, chunk_logits: int | None = None) -> torch.Tensor:
    """sum over labelled positions of log p(labels[b, t] | hidden[b, t]), a float32 scalar: the fused
    path when the head is a plain float `nn.Linear` without bias or adapter, else `token_logprobs`'."""
    plain = (isinstance(lm_head, nn.Linear) and lm_head.bias is None and getattr(lm_head, "lora", None) is None
             and lm_head.weight.is_floating_point())
    if not plain:
        return token_logprobs(hidden, labels, compute_logits, vocab_size, chunk_logits).sum()
    flat_labels = labels.flatten()
    rows = (flat_labels != -100).nonzero().squeeze(1)
    step = _chunk_rows(vocab_size, chunk_logits)
    return _HeadLogprobSum.apply(hidden.flatten(0, -2)[rows], lm_head.weight, flat_labels[rows], softcap, step,
                                 torch.is_grad_enabled())


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


class _HeadLogprobSum(torch.autograd.Function):
    """hidden [N, H] (labelled rows), weight [V, H], labels [N] -> sum of log-softmax(hidden @ weight.T)[labels],
    the products in autocast's dtype as the head's own forward would run them, the softmax in float32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, step, grad_enabled):
        dtype = _compute_dtype(hidden)
        need_hidden, need_weight = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], step):
                h, y = hidden[start:start + step].to(dtype), labels[start:start + step]
                total += _chunk_sum_and_grads(h, w, y, softcap, grad_hidden, grad_weight, start)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (None if grad_hidden is None else (grad_hidden * grad_output).to(hidden_dtype),
                None if grad_weight is None else (grad_weight * grad_output).to(weight_dtype),
                None, None, None, None)


def _chunk_sum_and_grads(h, w, y, softcap, grad_hidden, grad_weight, start) -> torch.Tensor:
    """One chunk of `_HeadLogprobSum.forward`: its log-probability sum, its gradients added into
    grad_hidden[start:] / grad_weight. One [rows, vocab] float32 buffer serves as logits, then
    exp(logits - max), then the gradient (a function, so it is freed before the next chunk's is made)."""
    logits = fp32_matmul.matmul_nt(h, w).float()
    if softcap is not None:
        capped = torch.tanh(logits.div_(softcap))
        logits = capped * softcap
    target = logits.gather(1, y[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()  # unnormalised softmax, in place
    norm = probs.sum(dim=-1, keepdim=True)
    chunk_sum = (target - (top + norm.log()).squeeze(1)).sum()
    if grad_hidden is None and grad_weight is None:
        return chunk_sum
    grad = probs.div_(norm).neg_()  # d sum / d logits = onehot - softmax
    grad[torch.arange(len(y), device=y.device), y] += 1
    if softcap is not None:
        grad.mul_(capped.square_().neg_().add_(1))  # d capped / d logits, in capped's own buffer
    grad = grad.to(h.dtype)
    if grad_hidden is not None:
        grad_hidden[start:start + len(h)] = fp32_matmul.matmul_nt(grad, w.t())
    if grad_weight is not None:
        fp32_matmul.add_matmul_tn(grad_weight, grad, h) if h.dtype == torch.float32 else grad_weight.add_(grad.t() @ h)
    return chunk_sum
