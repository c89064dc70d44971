"""Paged attention in plain PyTorch: the CPU backend and the reference for faster ones.

The batch is flat: decodes (one query token each) first, then prompt chunks.
Each layer first writes the step's new K/V into their cache slots, then attends:
- decodes together: gather each request's K/V slots into a padded batch and run
  one SDPA, folding the query heads that share a KV head into the query axis;
- each prompt chunk alone: over its fresh K/V with a causal kernel when it has
  no earlier context, else over its gathered context with a bottom-right causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ember.models.attention import causal_attention, causal_mask, expand_kv


@dataclass
class BatchLayout:
    """What the runner knows about one step's flat batch (generic over backends)."""

    query_lens: list[int]  # tokens per request this step
    context_lens: list[int]  # tokens already in the cache before this step
    block_tables: torch.Tensor  # [requests, max_blocks] int64, padded with the null block
    slot_mapping: torch.Tensor  # [tokens] int64: each new token's cache slot
    num_decodes: int  # the first requests have one query token each


@dataclass
class _PromptChunk:
    start: int
    end: int
    context_len: int
    slots: torch.Tensor | None  # cache slots of context + chunk, None without context


@dataclass
class TorchPagedContext:
    backend: "TorchPagedBackend"
    slot_mapping: torch.Tensor
    num_decodes: int
    decode_slots: torch.Tensor | None  # [decodes, max_len]
    decode_valid: torch.Tensor | None  # [decodes, max_len] bool
    decode_positions: torch.Tensor | None  # [decodes] position of each query token
    chunks: list[_PromptChunk]
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def _decode_mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            valid = self.decode_valid
            if window is not None:
                key_pos = torch.arange(valid.shape[1], device=valid.device)
                valid = valid & (key_pos[None, :] > self.decode_positions[:, None] - window)
            self._masks[window] = valid[:, None, None, :]
        return self._masks[window]

    def attend(self, layer, q, k, v, scale, sliding_window):
        k_cache, v_cache = self.backend.kv_caches[layer]
        k_cache.index_copy_(0, self.slot_mapping, k)
        v_cache.index_copy_(0, self.slot_mapping, v)
        out = torch.empty_like(q)
        nd = self.num_decodes
        if nd:
            num_kv, dim = k.shape[1], k.shape[2]
            # [decodes, kv_heads, heads_per_kv, dim]: the group's heads act as query rows.
            qd = q[:nd].view(nd, num_kv, -1, dim)
            kd = k_cache[self.decode_slots].transpose(1, 2)
            vd = v_cache[self.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self._decode_mask(sliding_window), scale=scale)
            out[:nd] = od.reshape(nd, -1, dim)
        for chunk in self.chunks:
            qc = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
            if chunk.slots is None:
                kc = k[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
                vc = v[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
                oc = causal_attention(qc, kc, vc, scale, sliding_window)
            else:
                group = q.shape[1] // k.shape[1]
                kc = expand_kv(k_cache[chunk.slots].transpose(0, 1), group, 0)
                vc = expand_kv(v_cache[chunk.slots].transpose(0, 1), group, 0)
                mask = causal_mask(chunk.end - chunk.start, chunk.slots.shape[0], sliding_window, q.device)
                oc = F.scaled_dot_product_attention(qc[0], kc, vc, attn_mask=mask, scale=scale)[None]
            out[chunk.start:chunk.end] = oc[0].transpose(0, 1)
        return out


class TorchPagedBackend:
    name = "torch_paged"

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int):
        self.kv_caches = kv_caches  # per layer, each [num_slots, kv_heads, head_dim]
        self.block_size = block_size

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        bs = self.block_size
        return block_table[..., positions // bs] * bs + positions % bs

    def build(self, layout: BatchLayout) -> TorchPagedContext:
        device = layout.slot_mapping.device
        nd = layout.num_decodes
        decode_slots = decode_valid = decode_positions = None
        if nd:
            seq_lens = torch.tensor(layout.context_lens[:nd], device=device) + 1
            key_pos = torch.arange(int(seq_lens.max()), device=device)
            decode_valid = key_pos[None, :] < seq_lens[:, None]
            decode_slots = torch.where(decode_valid, self._slots(layout.block_tables[:nd], key_pos), 0)
            decode_positions = seq_lens - 1
        chunks, start = [], nd
        for i in range(nd, len(layout.query_lens)):
            n, ctx = layout.query_lens[i], layout.context_lens[i]
            slots = None
            if ctx:
                slots = self._slots(layout.block_tables[i], torch.arange(ctx + n, device=device))
            chunks.append(_PromptChunk(start, start + n, ctx, slots))
            start += n
        return TorchPagedContext(self, layout.slot_mapping, nd, decode_slots, decode_valid, decode_positions, chunks)
