"""Attention backends over the paged KV cache, chosen once per engine.

A backend turns a step's `BatchLayout` into the `ctx` a model's attention layers
call (`ctx.attend(layer, q, k, v, scale, sliding_window)`). `torch_paged` runs
anywhere and is the reference every faster backend is tested against;
`cpu_paged` reads K/V blocks in place with a compiled C++ kernel.
"""

from __future__ import annotations

import torch

from ember.choices import ATTENTION_BACKENDS, KV_CACHE_DTYPES
from ember.engine.attention.cpu_paged import CpuPagedBackend, bf16_pairs_supported, load_kernels
from ember.engine.attention.torch_paged import BatchLayout, KVLayout, TorchPagedBackend

BACKENDS = {"torch_paged": TorchPagedBackend, "cpu_paged": CpuPagedBackend}
BACKEND_CHOICES = ATTENTION_BACKENDS
assert set(BACKEND_CHOICES) == {"auto", *BACKENDS}


def resolve_backend(name: str, device: torch.device, shape: tuple[int, int, int, int]) -> str:
    """shape: (num_heads, num_kv_heads, head_dim, block_size)."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"attention_backend: {name!r} is not one of {BACKEND_CHOICES}")
    cpu_ok = device.type == "cpu" and CpuPagedBackend.supports(*shape)
    if name == "auto":
        return "cpu_paged" if cpu_ok and load_kernels() else "torch_paged"
    if name == "cpu_paged":
        if not cpu_ok:
            raise ValueError(f"attention_backend: 'cpu_paged' does not support this model/device ({device}, {shape})")
        if not load_kernels():
            raise ValueError("attention_backend: 'cpu_paged' kernels could not be compiled (see the warning above)")
    return name



def choose_layout(backend: str, dtype: torch.dtype, kv_cache_dtype: str = "auto", batch_invariant: bool = False,
                  plain_attention: bool = True) -> KVLayout:
    """`plain_attention`: no layer soft-caps its logits or has sinks. The paired kernel has neither (those
    layers go to the PyTorch reference, whose bits depend on the batch), so batch-invariant engines of such
    models keep the transposed layout, whose kernel has both."""
    if kv_cache_dtype == "int8":
        return KVLayout(quantized=True, dtype=dtype)
    paired = backend == "cpu_paged" and dtype == torch.bfloat16 and bf16_pairs_supported() and \
        (plain_attention or not batch_invariant)
    return KVLayout(paired=paired, dtype=dtype)


def make_backend(name: str, kv_caches: list, block_size: int, layout: KVLayout, batch_invariant: bool = False):
    return BACKENDS[name](kv_caches, block_size, layout, batch_invariant)


__all__ = ["BACKENDS", "BACKEND_CHOICES", "KV_CACHE_DTYPES", "BatchLayout", "KVLayout", "choose_layout", "make_backend", "resolve_backend"]
