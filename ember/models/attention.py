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
    """What the engine passes as `ctx`: flat tokens of many requests plus their cache.

    `output_rows` (ascending row indices, or None for all) names the rows whose final hidden states the
    step uses (those it samples or scores). The other rows matter only for the K/V they leave in the
    cache, so a model may run its last layer past the K/V write for `output_rows` alone (`attend(...,
    rows=output_rows)`) and return just those rows: a prompt chunk's other rows skip the last layer's
    attention, output projection and MLP, which no later step reads."""

    output_rows: torch.Tensor | None

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,  # logits -> softcap * tanh(logits / softcap) (Gemma 2)
        sinks: torch.Tensor | None = None,  # [num_heads] sink logits in each softmax (gpt-oss)
        rows: torch.Tensor | None = None,  # every token's K/V is stored; attention only for these rows
    ) -> torch.Tensor:  # [num_tokens (or len(rows)), num_heads, head_dim]
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


# torch >= 2.5 attends grouped-query heads without copying K/V.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
         is_causal: bool = False) -> torch.Tensor:
    """SDPA over [batch, heads, seq, dim] with fewer K/V heads than query heads."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    if _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor,
                   softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention written out, for what SDPA cannot do (soft-capped logits, sink logits), as transformers'
    eager attention computes it: q [..., heads, q_len, dim], k/v [..., kv_heads, kv_len, dim], mask
    broadcastable to [..., heads, q_len, kv_len] (True = attend); sinks broadcastable to [..., heads, q_len, 1]."""
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = scores.softmax(dim=-1, dtype=torch.float32)
    else:  # each head's sink logit joins its softmax, then drops out: attention may go "nowhere"
        sink = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
        probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1, dtype=torch.float32)[..., :-1]
    return torch.matmul(probs.to(q.dtype), v)


def causal_attention(
    q: torch.Tensor,  # [batch, heads, seq, head_dim]
    k: torch.Tensor,  # [batch, kv_heads, seq, head_dim]
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,  # [batch, 1, seq, seq] block-causal mask (DocumentMask's)
) -> torch.Tensor:
    seq = q.shape[2]
    window = sliding_window if sliding_window is not None and sliding_window < seq else None
    if documents is None and window is None and softcap is None and sinks is None:
        return sdpa(q, k, v, scale, is_causal=True)
    mask = documents if documents is not None and window is None else causal_mask(seq, seq, window, q.device)
    if documents is not None and window is not None:
        mask = mask & documents
    if softcap is not None or sinks is not None:
        return attention_math(q, k, v, scale, mask, softcap, None if sinks is None else sinks.view(-1, 1, 1))
    return sdpa(q, k, v, scale, mask=mask)


class DocumentMask:
    """The training forward's context for windows packed with several documents (`data.packing:
    documents`): a token attends only to earlier tokens of its own document. The mask is built once
    per forward and shared by every layer (a layer with a sliding window narrows it further);
    q/k/v come as [batch, seq, heads, dim]."""

    def __init__(self, document_ids: torch.Tensor):  # [batch, seq], nondecreasing along each row
        seq = document_ids.shape[-1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
        self.mask = ((document_ids[:, :, None] == document_ids[:, None, :]) & causal)[:, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               sliding_window: int | None, softcap: float | None = None, sinks: torch.Tensor | None = None
               ) -> torch.Tensor:
        return causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, sliding_window,
                                softcap, sinks, self.mask).transpose(1, 2)


def document_context(document_ids: torch.Tensor) -> tuple[torch.Tensor, DocumentMask | None]:
    """Packed windows' `document_ids [batch, seq]` -> (positions restarting at 0 at each document's first
    token, the DocumentMask; None when every row holds one document: plain causal attention's fast path)."""
    index = torch.arange(document_ids.shape[-1], device=document_ids.device).expand_as(document_ids)
    if bool((document_ids[:, -1] == document_ids[:, 0]).all()):
        return index, None
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values
    return index - first, DocumentMask(document_ids)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layer: int,
           ctx: AttentionContext | None, sliding_window: int | None = None, softcap: float | None = None,
           sinks: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """q/k/v [..., tokens, heads, dim]: causal attention over [batch, seq] without a context,
    else the engine's paged attention (for `rows` only, if given: see AttentionContext)."""
    if ctx is None:
        return causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale,
                                sliding_window, softcap, sinks).transpose(1, 2)
    if rows is not None:
        return ctx.attend(layer, q, k, v, scale, sliding_window, softcap, sinks, rows=rows)
    if softcap is None and sinks is None:
        return ctx.attend(layer, q, k, v, scale, sliding_window)
    return ctx.attend(layer, q, k, v, scale, sliding_window, softcap, sinks)
