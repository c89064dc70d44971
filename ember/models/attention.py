"""The one place the training forward and the engine forward differ.

A model's attention layer projects q/k/v and applies rotary embeddings, then hands
the rest to `attend`. With no context (training, HF-parity tests) that is plain
causal attention over `[batch, seq]`. With a context (the engine) the context's
backend owns the paged KV cache: it stores the new k/v and attends over each
request's whole history. Models never import the engine; they only call
`ctx.attend(...)`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionContext(Protocol):
    """What the engine passes as `ctx`: flat tokens of many requests plus their cache."""

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


def causal_mask(
    q_len: int, kv_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask (True = attend); queries are the last q_len keys."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def expand_kv(x: torch.Tensor, group: int, head_dim: int = 1) -> torch.Tensor:
    """Repeat each kv head `group` times along `head_dim` (grouped-query attention)."""
    return x if group == 1 else x.repeat_interleave(group, dim=head_dim)


def causal_attention(
    q: torch.Tensor,  # [batch, heads, seq, head_dim]
    k: torch.Tensor,  # [batch, kv_heads, seq, head_dim]
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = expand_kv(k, group), expand_kv(v, group)
    seq = q.shape[2]
    if sliding_window is None or sliding_window >= seq:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = causal_mask(seq, seq, sliding_window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
