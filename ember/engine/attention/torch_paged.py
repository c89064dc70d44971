"""Paged attention in plain PyTorch: runs anywhere, and is the reference every faster
backend is tested against.

KV cache, per layer: K blocks [num_blocks, kv_heads, head_dim, block_size] (keys
transposed) and V blocks [num_blocks, kv_heads, block_size, head_dim]. A block keeps
each head's tokens contiguous so kernels stream them, and transposed keys let a CPU
kernel score a vector of keys with plain multiply-adds.

The batch is flat, requests ordered by query length, so decodes (one query token)
come first. Each layer first writes the step's new K/V into their slots, then:
- decodes together: gather their blocks into a padded batch, one SDPA call,
  with the query heads sharing a KV head folded into the query axis;
- each prompt chunk alone: over its fresh K/V with a causal kernel when it has no
  earlier context, else over its gathered blocks with a bottom-right causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ember.models.attention import attention_math, causal_attention, causal_mask, sdpa
from ember.models.huge_pages import huge_page_empty


@dataclass
class BatchLayout:
    """What the runner knows about one step's flat batch (generic over backends)."""

    query_lens: list[int]  # tokens per request this step, ascending
    context_lens: list[int]  # tokens already in the cache before this step
    block_tables: torch.Tensor  # [requests, max_blocks] int64, padded with the null block
    slot_mapping: torch.Tensor  # [tokens] int64: block * block_size + offset of each new token
    positions: torch.Tensor  # [tokens] int64
    # rows whose final hidden states the step uses, ascending (None: all): see AttentionContext.output_rows
    output_rows: torch.Tensor | None = None

    @property
    def num_decodes(self) -> int:
        return sum(1 for n in self.query_lens if n == 1)


@dataclass
class PromptChunk:
    start: int  # first row in the flat batch
    end: int
    context_len: int
    block_table: torch.Tensor  # this request's blocks covering context + chunk


LayerCache = tuple  # (k, v) blocks, or (k, v, k_scales, v_scales) for int8 caches


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, heads, dim] -> int8 values and one bf16 scale per token and head (absmax / 127)."""
    scale = (x.float().abs().amax(dim=-1) / 127).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round(x.float() / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def split_slots(slot_mapping: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # (torch.div and torch.remainder directly: `//` and `%` go through a Python wrapper on every step)
    return torch.div(slot_mapping, block_size, rounding_mode="floor"), torch.remainder(slot_mapping, block_size)


class KVLayout:
    """How K and V tokens sit inside a block; backends and the runner agree on one.

    "transposed": K [blocks, kv_heads, head_dim, block_size], V [blocks, kv_heads, block_size, head_dim].
    "paired" (bf16 with AVX512-BF16): K [blocks, kv_heads, head_dim/2, block_size, 2] and
    V [blocks, kv_heads, block_size/2, head_dim, 2], the operand order of bf16 pair dot products.
    "quantized" (kv_cache_dtype int8): transposed int8 blocks plus K and V scales
    [blocks, kv_heads, block_size] in bf16, one per token and head: ~half the bytes of bf16.
    """

    def __init__(self, paired: bool = False, quantized: bool = False, dtype: torch.dtype = torch.float32):
        if paired and quantized:
            raise ValueError("an int8 KV cache uses the transposed layout")
        self.paired = paired
        self.quantized = quantized
        self.dtype = dtype  # what attention computes in (the model's dtype)

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.quantized else self.dtype

    def bytes_per_token_head(self, head_dim: int) -> int:
        """K and V bytes of one token of one KV head."""
        if self.quantized:
            return 2 * (head_dim + 2)
        return 2 * head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def shapes(self, num_blocks: int, kv_heads: int, block_size: int, head_dim: int):
        if self.paired:
            return ((num_blocks, kv_heads, head_dim // 2, block_size, 2),
                    (num_blocks, kv_heads, block_size // 2, head_dim, 2))
        return (num_blocks, kv_heads, head_dim, block_size), (num_blocks, kv_heads, block_size, head_dim)

    def allocate(self, num_layers: int, num_blocks: int, kv_heads: int, block_size: int, head_dim: int,
                 device: torch.device | str = "cpu") -> list[LayerCache]:
        """Every layer's caches in one uninitialised buffer (and one more for int8 scales).

        Within a layer, block b's K and V sit side by side, so a request's blocks read as
        one stretch of memory instead of two streams a whole cache apart, which CPU decode
        attention reads faster (BENCHMARKS.md), as it does from huge pages. K and V are thus strided views
        ([num_blocks, ...] with each block contiguous); the kernels take the stride from them.
        """
        k_shape, v_shape = self.shapes(num_blocks, kv_heads, block_size, head_dim)
        per_block = kv_heads * block_size * head_dim
        shape = (num_layers, num_blocks, 2, per_block)
        if torch.device(device).type == "cpu":  # decode attention reads random blocks: fewer TLB misses
            buffer = huge_page_empty(shape, self.storage_dtype)
        else:
            buffer = torch.empty(shape, dtype=self.storage_dtype, device=device)
        caches = [(buffer[i, :, 0].unflatten(1, k_shape[1:]), buffer[i, :, 1].unflatten(1, v_shape[1:]))
                  for i in range(num_layers)]
        if self.quantized:
            scales = torch.ones(num_layers, 2, num_blocks, kv_heads, block_size, dtype=torch.bfloat16, device=device)
            caches = [cache + (scales[i, 0], scales[i, 1]) for i, cache in enumerate(caches)]
        return caches

    def block_size(self, v_cache: torch.Tensor) -> int:
        return v_cache.shape[2] * 2 if self.paired else v_cache.shape[2]

    def write(self, cache: LayerCache, slots, k, v) -> None:
        """slots: each new token's slot number, or (block, offset) pairs already split (once per step)."""
        k_cache, v_cache = cache[0], cache[1]
        blocks, offsets = split_slots(slots, self.block_size(v_cache)) if isinstance(slots, torch.Tensor) else slots
        if self.quantized:
            k, k_scale = quantize_heads(k)
            v, v_scale = quantize_heads(v)
            cache[2][blocks, :, offsets] = k_scale
            cache[3][blocks, :, offsets] = v_scale
        if self.paired:
            k_cache[blocks, :, :, offsets] = k.unflatten(-1, (-1, 2))
            v_cache[blocks, :, offsets // 2, :, offsets % 2] = v
        else:
            k_cache[blocks, :, :, offsets] = k
            v_cache[blocks, :, offsets] = v

    def gather(self, cache: LayerCache, block_table: torch.Tensor, keys: bool) -> torch.Tensor:
        """[..., blocks] table -> [..., kv_heads, blocks * block_size, head_dim] copy."""
        flat_table = block_table.reshape(-1)
        picked = cache[0 if keys else 1].index_select(0, flat_table)
        if self.quantized:  # scales [n, h, bs] sit on the token axis: last for K, second to last for V
            scales = cache[2 if keys else 3].index_select(0, flat_table).to(self.dtype)
            picked = picked.to(self.dtype) * (scales[:, :, None, :] if keys else scales[..., None])
        if self.paired and keys:  # [n, h, d/2, bs, 2] -> [n, h, bs, d]
            picked = picked.permute(0, 1, 3, 2, 4).flatten(-2)
        elif self.paired:  # [n, h, bs/2, d, 2] -> [n, h, bs, d]
            picked = picked.transpose(-1, -2).flatten(-3, -2)
        elif keys:
            picked = picked.transpose(-1, -2)
        _, heads, block_size, dim = picked.shape
        picked = picked.reshape(*block_table.shape, heads, block_size, dim).transpose(-3, -4)
        return picked.reshape(*block_table.shape[:-1], heads, block_table.shape[-1] * block_size, dim)


def chunk_attention(q, k, v, cache: LayerCache, layout: KVLayout, chunk: PromptChunk, scale, sliding_window,
                    softcap=None, sinks=None):
    """One prompt chunk [tokens, heads, dim] -> its attention output."""
    qc = q[chunk.start:chunk.end].transpose(0, 1)
    if chunk.context_len == 0:
        kc = k[chunk.start:chunk.end].transpose(0, 1)
        vc = v[chunk.start:chunk.end].transpose(0, 1)
        return causal_attention(qc[None], kc[None], vc[None], scale, sliding_window, softcap, sinks)[0].transpose(0, 1)
    kv_len = chunk.context_len + chunk.end - chunk.start
    kc = layout.gather(cache, chunk.block_table, keys=True)[:, :kv_len]
    vc = layout.gather(cache, chunk.block_table, keys=False)[:, :kv_len]
    mask = causal_mask(chunk.end - chunk.start, kv_len, sliding_window, q.device)
    if softcap is not None or sinks is not None:
        out = attention_math(qc[None], kc[None], vc[None], scale, mask, softcap, None if sinks is None else sinks.view(-1, 1, 1))
        return out[0].transpose(0, 1)
    # 4-D inputs: the fused CPU kernel takes them; 3-D ones fall back to the slow math path.
    return sdpa(qc[None], kc[None], vc[None], scale, mask=mask)[0].transpose(0, 1)


@dataclass
class TorchPagedContext:
    kv_caches: list[LayerCache]
    layout: KVLayout
    slots: tuple[torch.Tensor, torch.Tensor]  # (block, offset) of each new token
    num_decodes: int
    decode_blocks: torch.Tensor | None  # [decodes, blocks]
    decode_valid: torch.Tensor | None  # [decodes, blocks * block_size] bool
    decode_positions: torch.Tensor | None  # [decodes]
    chunks: list[PromptChunk]
    output_rows: torch.Tensor | None = None
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def _decode_mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            valid = self.decode_valid
            if window is not None:
                key_pos = torch.arange(valid.shape[1], device=valid.device)
                valid = valid & (key_pos[None, :] > self.decode_positions[:, None] - window)
            self._masks[window] = valid[:, None, None, :]
        return self._masks[window]

    def attend(self, layer, q, k, v, scale, sliding_window, softcap=None, sinks=None, rows=None):
        cache = self.kv_caches[layer]
        self.layout.write(cache, self.slots, k, v)
        out = self.attend_written(layer, q, k, v, scale, sliding_window, softcap, sinks)
        return out if rows is None else out[rows]  # the reference: every row, then the ones asked for

    def attend_written(self, layer, q, k, v, scale, sliding_window, softcap=None, sinks=None):
        """attend() once the new tokens' K/V are in the cache (the CPU backend falls back to this)."""
        cache = self.kv_caches[layer]
        out = torch.empty_like(q)
        nd = self.num_decodes
        if nd:
            num_kv, dim = k.shape[1], k.shape[2]
            qd = q[:nd].view(nd, num_kv, -1, dim)  # the group's heads act as query rows
            # Slots past each request's length hold whatever the buffer held (it is never cleared,
            # and NaN * 0 is NaN): zero them, so the mask alone decides.
            unset = ~self.decode_valid[:, None, :, None]
            kd = self.layout.gather(cache, self.decode_blocks, keys=True).masked_fill(unset, 0)
            vd = self.layout.gather(cache, self.decode_blocks, keys=False).masked_fill(unset, 0)
            if softcap is not None or sinks is not None:
                od = attention_math(qd, kd, vd, scale, self._decode_mask(sliding_window), softcap,
                                    None if sinks is None else sinks.view(num_kv, -1, 1))
            else:
                od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self._decode_mask(sliding_window), scale=scale)
            out[:nd] = od.reshape(nd, -1, dim)
        for chunk in self.chunks:
            out[chunk.start:chunk.end] = chunk_attention(q, k, v, cache, self.layout, chunk, scale, sliding_window,
                                                         softcap, sinks)
        return out


class TorchPagedBackend:
    name = "torch_paged"

    def __init__(self, kv_caches: list[LayerCache], block_size: int, layout: KVLayout, batch_invariant: bool = False):
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.layout = layout
        self.batch_invariant = batch_invariant

    def chunks(self, layout: BatchLayout, first_request: int, first_row: int) -> list[PromptChunk]:
        chunks, start = [], first_row
        for i in range(first_request, len(layout.query_lens)):
            n, ctx = layout.query_lens[i], layout.context_lens[i]
            table = layout.block_tables[i, : -(-(ctx + n) // self.block_size)]
            chunks.append(PromptChunk(start, start + n, ctx, table))
            start += n
        return chunks

    def build(self, layout: BatchLayout) -> TorchPagedContext:
        nd = layout.num_decodes
        blocks = valid = positions = None
        if nd:
            seq_lens = torch.tensor(layout.context_lens[:nd], device=layout.positions.device) + 1
            num_blocks = -(-int(seq_lens.max()) // self.block_size)
            blocks = layout.block_tables[:nd, :num_blocks]
            key_pos = torch.arange(num_blocks * self.block_size, device=seq_lens.device)
            valid = key_pos[None, :] < seq_lens[:, None]
            positions = seq_lens - 1
        slots = split_slots(layout.slot_mapping, self.block_size)
        return TorchPagedContext(self.kv_caches, self.layout, slots, nd, blocks, valid, positions,
                                 self.chunks(layout, nd, nd), layout.output_rows)
