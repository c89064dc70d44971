"""Trainer -> engine weight sync, in memory.

The engine and the trainer build the same model class, so a trainer's state dict (full, or
gathered from FSDP2 shards on rank 0) is copied into the engine by parameter name, in place:
no file round trip, no conversion. The engine forgets its prefix cache (the KV came from the
old weights) and bumps its weight version, which every later output carries.
"""

from __future__ import annotations

import time

import torch


def push_weights(trainer, engine, lora_request=None) -> dict[str, float]:
    """Copy the trainer's current weights into the engine (call on every rank; rank 0 pushes); with
    `lora_request` (a trainer fitting a LoRA adapter) only the adapter, into that served adapter.
    Returns {"seconds", "bytes", "weight_version"}."""
    engine = getattr(engine, "engine", engine)  # an LLM or its LLMEngine
    start = time.perf_counter()
    state = trainer.state_dict_for_engine()
    if state and lora_request is not None:
        from ember.models.lora import adapter_tensors

        state = adapter_tensors(trainer.model, state)
    size = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    if not state:
        version = engine.weight_version
    elif lora_request is not None:
        version = engine.update_lora(lora_request, state)
    else:
        version = engine.update_weights(state)
    return {"seconds": time.perf_counter() - start, "bytes": size, "weight_version": version}
