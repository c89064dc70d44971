"""Embeddings with an encoder model: length-sorted packed batches, no KV cache, pooled vectors."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from ember.models import load_model
from ember.models.bert import EncoderSegments, Pooling
from ember.tokenizer import Tokenizer


class EmbeddingEngine:
    def __init__(self, model: str, dtype: str = "auto", device: str = "cpu", max_num_batched_tokens: int = 8192,
                 **_: Any):
        from ember.engine.llm_engine import resolve_device

        self.device = resolve_device(device)
        self.model, self.model_config = load_model(model, dtype=dtype, device=self.device)
        self.tokenizer = Tokenizer(model)
        self.pooling = Pooling.from_dir(model)
        self.max_len = min(self.pooling.max_seq_length, self.model_config.max_position_embeddings)
        self.budget = max_num_batched_tokens

    @property
    def dimensions(self) -> int:
        return self.model_config.hidden_size

    def tokenize(self, item: str | list[int], truncate: int | None = None) -> list[int]:
        """Token ids of one input; longer than the model takes is an error unless `truncate` says how
        many tokens to keep (-1: as many as the model takes; vLLM's truncate_prompt_tokens)."""
        if isinstance(item, str):
            if not item:
                raise ValueError("input: '' is empty")
            if truncate is None and len(item) > self.max_len * self.tokenizer.max_token_chars:
                raise ValueError(f"input: {len(item)} characters cannot fit the model's {self.max_len} tokens")
            ids = self.tokenizer.encode(item, field="input")
        else:
            ids = list(item)
            vocab = self.model_config.vocab_size
            if not ids or any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise ValueError(f"input: token ids must be a non-empty list of ids in [0, {vocab})")
        if truncate is None:
            if len(ids) > self.max_len:
                raise ValueError(f"input: {len(ids)} tokens are more than the model's {self.max_len} (pass "
                                 "truncate_prompt_tokens to cut them)")
            return ids
        if truncate != -1 and not 1 <= truncate <= self.max_len:
            raise ValueError(f"truncate_prompt_tokens: {truncate} must be -1 or in [1, {self.max_len}]")
        keep = self.max_len if truncate == -1 else truncate
        return ids[:keep]  # the first tokens, as sentence-transformers keeps

    @torch.inference_mode()
    def embed(self, inputs: list[str | list[int]], truncate: int | None = None) -> tuple[torch.Tensor, int]:
        """(embeddings [len(inputs), dimensions] fp32, tokens used), in input order."""
        token_lists = [self.tokenize(x, truncate) for x in inputs]
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        out = torch.empty(len(token_lists), self.dimensions)
        batch: list[int] = []
        for i in itertools.chain(order, [None]):
            if i is not None and (not batch or (len(batch) + 1) * len(token_lists[i]) <= self.budget):
                batch.append(i)
                continue
            lengths = [len(token_lists[j]) for j in batch]
            ids = torch.tensor([t for j in batch for t in token_lists[j]], device=self.device)
            positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
            hidden = self.model(ids, positions, EncoderSegments(lengths))
            out[batch] = self.pooling(hidden.float(), lengths).cpu()
            batch = [i] if i is not None else []
        return out, sum(len(t) for t in token_lists)
