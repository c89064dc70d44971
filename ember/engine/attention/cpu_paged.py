"""CPU backend: attention over K/V blocks read in place by a small C++ kernel.

The gather in `torch_paged` copies every decode's whole context each layer, which
costs more than the attention itself. Here `paged_cpu.cpp` walks each request's
block table and computes scores, an online softmax and the weighted V sum in one
pass. With bf16 in the paired layout (AVX512-BF16) it takes the whole batch, prompt
chunks included: a chunk's rows go in tiles that share each K/V load, which beats SDPA
for fresh prompts and by more for chunks over cached context (SDPA there also pays for
gathering the blocks; BENCHMARKS.md has the figures). Other layouts (fp32, an
int8 cache) send requests of up to `KERNEL_MAX_QUERY` new tokens (decodes, short chunks,
speculative drafts) through the kernel and keep SDPA for longer prompt chunks, whose
blocked matmuls win there; an int8 cache's fresh prompts thus attend over their own
unquantized K/V, as other engines do. With `batch_invariant` (the engine's default) every row goes
through the kernel, with a per-row order that does not depend on the batch (the paired kernel in its
invariant tiling, see paged_cpu.cpp; the transposed layout's kernel for models with soft-capped logits or
sinks): a token's attention output is the same bits whether it came in a prompt chunk, a decode, a
verification or after a prefix-cache hit.

The kernel is compiled on first use (torch.utils.cpp_extension, cached in
~/.cache/torch_extensions); without a compiler ember falls back to torch_paged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.engine.attention.torch_paged import (BatchLayout, KVLayout, LayerCache, PromptChunk, TorchPagedBackend,
                                                chunk_attention, split_slots)
from ember.models.cpu_build import build

KERNEL_MAX_QUERY = 16  # unpaired layouts (fp32, int8): the requests the kernel takes
logger = logging.getLogger(__name__)
_declined: set[str] = set()  # reasons already logged


def bf16_pairs_supported() -> bool:
    """Whether the compiled kernel has the AVX512-BF16 path for the paired bf16 layout."""
    return load_kernels() and bool(torch.ops.ember_cpu.bf16_pairs_supported())


def load_kernels() -> bool:
    """Compile (or load the cached build of) the C++ kernels; False if that is impossible."""
    return build("ember_paged_cpu", str(Path(__file__).with_name("paged_cpu.cpp")))


@dataclass
class CpuPagedContext:
    kv_caches: list[LayerCache]
    layout: KVLayout
    slots: tuple[torch.Tensor, torch.Tensor]  # (block, offset) of each new token
    num_kernel_rows: int  # the first rows, attended by the kernel
    block_tables: torch.Tensor
    token_request: torch.Tensor | None  # [kernel rows] request index of each row (None: decode_only)
    kv_lens: torch.Tensor  # [kernel rows] keys visible to each row (its position + 1)
    chunks: list[PromptChunk]
    reference: Callable[[], "object"]  # the torch_paged context of this batch, for layers the kernel declines
    decode_only: bool = False  # paired layout, every request one new token
    invariant: bool = False  # the paired kernel's batch-invariant tiling for prompt rows
    output_rows: torch.Tensor | None = None  # see AttentionContext

    def decode_stack_args(self, layers: list[int]):
        """For a decode-only batch, what cpu_ops.cpp's decode_stack needs to run `layers`' attention as
        attend() would (K caches, V caches, slots, block tables, key counts); None for other batches."""
        if not self.decode_only:
            return None
        return ([self.kv_caches[i][0] for i in layers], [self.kv_caches[i][1] for i in layers], *self.slots,
                self.block_tables, self.kv_lens)

    def attend(self, layer, q, k, v, scale, sliding_window, softcap=None, sinks=None, rows=None):
        """Every row's K/V into the cache; attention for every row, or for `rows` alone: the kernel then
        takes just those rows (each row's result is the same either way under the invariant tiling)."""
        cache = self.kv_caches[layer]
        if rows is not None and (self.chunks or self.decode_only or
                                 (self.layout.paired and (softcap is not None or sinks is not None))):
            return self.attend(layer, q, k, v, scale, sliding_window, softcap, sinks)[rows]
        if self.layout.paired and (softcap is not None or sinks is not None):
            reason = "soft-capped attention logits" if softcap is not None else "attention sinks"
            if reason not in _declined:
                _declined.add(reason)
                logger.info("cpu_paged: the bf16 paired kernel has no %s; those layers use the PyTorch reference "
                            "attention (torch_paged) over the same cache", reason)
            torch.ops.ember_cpu.write_paired.default(cache[0], cache[1], k, v, *self.slots)
            return self.reference().attend_written(layer, q, k, v, scale, sliding_window, softcap, sinks)
        if self.decode_only:  # the kernel writes each row's K/V as it reaches them (see paged_cpu.cpp)
            return torch.ops.ember_cpu.decode_attention_paired(
                q, cache[0], cache[1], k, v, *self.slots, self.block_tables, self.kv_lens, sliding_window or 0, scale)
        if self.layout.paired:
            torch.ops.ember_cpu.write_paired.default(cache[0], cache[1], k, v, *self.slots)
        elif not self.layout.quantized and k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2]:
            torch.ops.ember_cpu.write_transposed.default(cache[0], cache[1], k, v, *self.slots)
        else:
            self.layout.write(cache, self.slots, k, v)
        kernel_rows = self.num_kernel_rows
        kernel_out = None
        if kernel_rows:
            scales = dict(zip(("k_scales", "v_scales"), cache[2:]))
            if rows is None:
                q_rows, token_request, kv_lens = q[:kernel_rows], self.token_request, self.kv_lens
            else:  # (no chunks here: every row is a kernel row)
                q_rows, token_request, kv_lens = q[rows], self.token_request[rows], self.kv_lens[rows]
            kernel_out = torch.ops.ember_cpu.paged_attention.default(
                q_rows, *cache[:2], self.block_tables, token_request, kv_lens,
                sliding_window or 0, scale, **scales, softcap=softcap or 0.0,
                sinks=None if sinks is None else sinks.float().contiguous(), invariant=self.invariant,
            )
            if not self.chunks:
                return kernel_out
        out = torch.empty_like(q)
        if kernel_out is not None:
            out[:kernel_rows] = kernel_out
        for chunk in self.chunks:
            out[chunk.start:chunk.end] = chunk_attention(q, k, v, cache, self.layout, chunk, scale, sliding_window,
                                                         softcap, sinks)
        return out


class CpuPagedBackend(TorchPagedBackend):
    name = "cpu_paged"

    @staticmethod
    def supports(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> bool:
        group = num_heads // num_kv_heads
        return 1 <= group <= 8 and head_dim % 16 == 0 and block_size % 16 == 0

    def build(self, layout: BatchLayout) -> CpuPagedContext:
        num_kernel = 0  # the kernel takes the batch's first requests (ordered by query length)
        if self.layout.paired or self.batch_invariant:
            num_kernel = len(layout.query_lens)
        while num_kernel < len(layout.query_lens) and layout.query_lens[num_kernel] <= KERNEL_MAX_QUERY:
            num_kernel += 1
        rows = sum(layout.query_lens[:num_kernel])
        device = layout.positions.device
        chunks = self.chunks(layout, num_kernel, rows)
        decode_only = self.layout.paired and rows == num_kernel == len(layout.query_lens) and not chunks
        # (each op here costs ~20 us after a decode step has streamed the weights through the caches)
        token_request = None if decode_only else torch.arange(num_kernel, device=device)  # the decode kernel needs none
        if rows > num_kernel:  # some requests bring several rows
            token_request = torch.repeat_interleave(
                token_request, torch.tensor(layout.query_lens[:num_kernel], dtype=torch.int64, device=device))
        positions = layout.positions if rows == layout.positions.shape[0] else layout.positions[:rows]
        reference = None

        def reference_context():
            nonlocal reference
            reference = reference or TorchPagedBackend.build(self, layout)
            return reference

        return CpuPagedContext(
            self.kv_caches, self.layout, split_slots(layout.slot_mapping, self.block_size), rows, layout.block_tables, token_request,
            positions + 1, chunks, reference_context, decode_only=decode_only, invariant=self.batch_invariant,
            output_rows=layout.output_rows,
        )
