"""Attention backends over the paged KV cache, chosen once per engine.

A backend turns a step's `BatchLayout` into the `ctx` a model's attention layers
call (`ctx.attend(layer, q, k, v, scale, sliding_window)`). `torch_paged` runs
anywhere and is the reference every faster backend is tested against.
"""

from __future__ import annotations

import torch

from ember.engine.attention.torch_paged import BatchLayout, TorchPagedBackend

BACKENDS = {"torch_paged": TorchPagedBackend}


def make_backend(name: str, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int):
    if name not in BACKENDS:
        raise ValueError(f"attention_backend: {name!r} is not one of {sorted(BACKENDS)}")
    return BACKENDS[name](kv_caches, block_size)


__all__ = ["BACKENDS", "BatchLayout", "make_backend"]
