"""Next-token log-probabilities for training without the full [tokens, vocab] logits in memory.

The LM head and the log-softmax run over a bounded number of rows at a time, only for the positions
that have a label, and each chunk is recomputed in backward (activation checkpointing), so a step
holds at most one chunk's logits and their gradient: with a 152k vocabulary (Qwen2) and 4,096 tokens
that is ~64 MiB instead of ~2.5 GiB of float32 logits (and as much again for their gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_LOGITS = 1 << 24  # logits per chunk (64 MiB in float32)


def _chunk_logprobs(hidden: torch.Tensor, labels: torch.Tensor, compute_logits: Callable) -> torch.Tensor:
    return -F.cross_entropy(compute_logits(hidden).float(), labels, reduction="none")


def token_logprobs(hidden: torch.Tensor, labels: torch.Tensor, compute_logits: Callable, vocab_size: int,
                   chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """log p(labels[b, t] | hidden[b, t]) as float32 [B, T]; 0 where the label is -100 (not trained on)."""
    flat_hidden, flat_labels = hidden.flatten(0, -2), labels.flatten()
    rows = (flat_labels != -100).nonzero().squeeze(1)
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device)
    step = max(1, chunk_logits // vocab_size)
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
    return out.view(labels.shape)
