"""Model weights (and the KV cache) on CPU in buffers backed by 2 MiB pages.

Decoding a few rows reads every weight once per token, so it runs at the memory
system's streaming rate. Spread over 4 KiB pages that rate is lower: the
hardware prefetchers stop at every page boundary and each page costs a TLB miss.
Moving all weights into one 2 MiB-aligned anonymous mapping that the kernel is
asked to back with transparent huge pages (madvise MADV_HUGEPAGE, which the default
"madvise" THP setting honours) makes decode-sized products faster on the bench
models (BENCHMARKS.md). Values, shapes and parameter identities stay as they
were; only the storage moves. The KV cache is allocated there too: decode attention reads
each request's blocks from random places in it.
"""

from __future__ import annotations

import logging
import mmap

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line


def _huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """A uint8 tensor of `nbytes` starting on a 2 MiB boundary, in memory madvised for huge
    pages; None where the platform can't."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:  # private and anonymous: shared mappings would take THP's (usually disabled) shmem setting
        mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError) as e:
        logger.debug("huge pages unavailable: %s", e)
        return None
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping alive
    offset = -raw.data_ptr() % HUGE_PAGE
    return raw[offset:offset + nbytes]


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` in huge pages (`t` itself if it is under 2 MiB or
    huge pages are unavailable)."""
    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE_PAGE or (buffer := _huge_page_buffer(nbytes)) is None:
        return t
    home = buffer.view(t.dtype).view(t.shape)
    home.copy_(t)
    return home


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in huge pages (a plain `torch.empty` where it is under 2 MiB
    or the platform can't)."""
    t = torch.empty(shape, dtype=dtype, device="meta")
    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE_PAGE or (buffer := _huge_page_buffer(nbytes)) is None:
        return torch.empty(shape, dtype=dtype)
    return buffer.view(dtype).view(shape)


def rehome_weights(model: nn.Module, min_bytes: int = 16 << 20) -> int:
    """Copy the CPU parameters and buffers of `model` into one huge-page-backed buffer and
    point them at it. Returns the bytes moved (0 where the platform can't, or the model is
    smaller than `min_bytes`)."""
    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None and t.device.type == "cpu" and t.is_contiguous() and t.numel():
                    tensors.setdefault(id(t), t)
    sizes = {key: -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for key, t in tensors.items()}
    total = sum(sizes.values())
    if total < min_bytes or (raw := _huge_page_buffer(total)) is None:
        return 0
    offset = 0
    moved: dict[int, torch.Tensor] = {}
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        home = raw[offset:offset + nbytes].view(t.dtype).view(t.shape)
        home.copy_(t.detach())
        moved[key] = home
        offset += sizes[key]
    for module in model.modules():
        for name, t in module._parameters.items():
            if t is not None and id(t) in moved:
                t.data = moved[id(t)]  # the same Parameter object: tied weights stay tied
                for cached in ("_ember_packed", "_ember_pairs", "_ember_swiglu"):  # packed copies of the old storage (cpu_ops)
                    t.__dict__.pop(cached, None)
        for name, t in list(module._buffers.items()):
            if t is not None and id(t) in moved:
                module._buffers[name] = moved[id(t)]
    return total
