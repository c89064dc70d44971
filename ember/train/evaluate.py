"""Held-out loss of an HF model directory on text/JSONL files (`ember train eval`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def heldout_loss(model: str, files: list[str], seq_len: int = 256, text_field: str = "text",
                 batch_size: int = 8, quantization: str | None = None, group_size: int = 64) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, tokens scored), packed like training data;
    with `quantization` ("int8" | "int4"), of the model as the engine would quantize it."""
    from ember.models import load_model
    from ember.registry import resolve_model
    from ember.tokenizer import Tokenizer
    from ember.train.data import PackedDataset, expand_files, tokenize_files

    path = resolve_model(model)
    net, _ = load_model(path, dtype="float32")
    if quantization is not None:
        from ember.models.quant import QuantConfig, quantize_model

        quantize_model(net, QuantConfig(quantization, group_size))
    tokenizer = Tokenizer(path)
    ids = tokenize_files(expand_files(tuple(files), "data"), tokenizer, text_field, cache_dir=None)
    data = PackedDataset(ids, seq_len)
    if len(data) == 0:
        raise ValueError(f"data: {len(ids)} tokens do not make one sequence of {seq_len}")
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        inputs, labels = data.batch(list(range(start, min(len(data), start + batch_size))))
        logits = net(inputs).float()
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count, count
