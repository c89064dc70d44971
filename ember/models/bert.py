"""BERT-family encoders for embeddings (BertModel), with sentence-transformers pooling.

Engine mode is the same flat batch as the decoders, but attention is bidirectional within
each sequence and nothing is cached: `ctx` is an `EncoderSegments` (the sequence lengths).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.config import ModelConfig
from ember.models.layers import _ACTIVATIONS, MergedLinear


@dataclass
class EncoderSegments:
    lengths: list[int]  # tokens of each sequence in the flat batch, in order

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """[tokens, heads, dim] -> padded [sequences, heads, longest, dim], one SDPA call, unpadded."""
        n, longest = len(self.lengths), max(self.lengths)
        index, valid = _padding(self.lengths, q.device)
        pad = lambda x: x.new_zeros(n * longest, *x.shape[1:]).index_copy_(0, index, x).view(  # noqa: E731
            n, longest, *x.shape[1:]).transpose(1, 2)
        mask = valid.view(n, 1, 1, longest)
        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(n * longest, *q.shape[1:]).index_select(0, index)


def _padding(lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(lengths)
    valid = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return valid.flatten().nonzero().squeeze(1), valid


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.self = nn.Module()
        self.self.qkv = MergedLinear(h, [h, h, h], ["query", "key", "value"], bias=True)
        self.output = nn.Module()
        self.output.dense = nn.Linear(h, h)
        self.output.LayerNorm = nn.LayerNorm(h, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, segments: EncoderSegments) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in self.self.qkv(x).chunk(3, dim=-1))
        attn = segments.attend(q, k, v, self.head_dim**-0.5).flatten(-2)
        return self.output.LayerNorm(x + self.output.dense(attn))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.attention = BertAttention(config)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(h, i)
        self.output = nn.Module()
        self.output.dense = nn.Linear(i, h)
        self.output.LayerNorm = nn.LayerNorm(h, eps=config.rms_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x, segments):
        x = self.attention(x, segments)
        return self.output.LayerNorm(x + self.output.dense(self.act(self.intermediate.dense(x))))


class BertModel(nn.Module):
    is_encoder = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.embeddings.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.embeddings.token_type_embeddings = nn.Embedding(config.raw.get("type_vocab_size", 2), h)
        self.embeddings.LayerNorm = nn.LayerNorm(h, eps=config.rms_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def tie_weights(self) -> None:
        pass

    def blocks(self) -> nn.ModuleList:
        return self.encoder.layer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, segments: EncoderSegments) -> torch.Tensor:
        """Flat `input_ids[N]` of several sequences -> hidden states `[N, hidden]`."""
        e = self.embeddings
        x = e.word_embeddings(input_ids) + e.position_embeddings(positions) + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        for layer in self.encoder.layer:
            x = layer(x, segments)
        return x


@dataclass(frozen=True)
class Pooling:
    """sentence-transformers' pooling and normalisation, from the model directory."""

    mode: str = "mean"  # mean | cls | max
    normalize: bool = False
    max_seq_length: int = 512

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Pooling":
        model_dir = Path(model_dir)
        mode, normalize, max_len = "mean", False, 512
        modules = model_dir / "modules.json"
        if modules.is_file():
            entries = json.loads(modules.read_text())
            normalize = any(m.get("type", "").endswith("Normalize") for m in entries)
            for m in entries:
                if m.get("type", "").endswith("Pooling"):
                    cfg = json.loads((model_dir / m["path"] / "config.json").read_text())
                    mode = "cls" if cfg.get("pooling_mode_cls_token") else "max" if cfg.get(
                        "pooling_mode_max_tokens") else "mean"
        st_config = model_dir / "sentence_bert_config.json"
        if st_config.is_file():
            max_len = int(json.loads(st_config.read_text()).get("max_seq_length", max_len))
        return cls(mode, normalize, max_len)

    def __call__(self, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        pooled = []
        for chunk in hidden.split(lengths):
            pooled.append(chunk[0] if self.mode == "cls" else chunk.amax(0) if self.mode == "max" else chunk.mean(0))
        out = torch.stack(pooled)
        return F.normalize(out, dim=-1) if self.normalize else out
