"""GPT-2: learned positions, LayerNorm, GELU, fused c_attn; weights stored as HF Conv1D ([in, out]),
transposed on load and export. Attention goes through the same context as every decoder."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ember.models.attention import (
    AttentionContext,
    DocumentMask,
    attend,
    document_context,
)
from ember.models.config import ModelConfig
from ember.models.layers import _ACTIVATIONS, Linear, TransposedLinear
from ember.models.loss import token_logprob_sum, token_logprobs


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.num_heads, self.head_dim = layer, config.num_heads, config.head_dim
        self.c_attn = TransposedLinear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = TransposedLinear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, ctx: AttentionContext | None) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in self.c_attn(x).chunk(3, dim=-1))
        return self.c_proj(attend(q, k, v, self.head_dim**-0.5, self.layer, ctx).flatten(-2))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = TransposedLinear(config.hidden_size, config.intermediate_size)
        self.c_proj = TransposedLinear(config.intermediate_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = GPT2Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x, ctx):
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids, positions, ctx):
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            if self.gradient_checkpointing and self.training and (ctx is None or isinstance(ctx, DocumentMask)):
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight  # GPT-2 always ties them

    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.transformer.gradient_checkpointing = enabled

    def forward(self, input_ids, positions=None, ctx=None, labels=None, document_ids=None, reduction="none"):
        """As LlamaForCausalLM.forward."""
        engine = ctx is not None
        if document_ids is not None:
            positions, ctx = document_context(document_ids)
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        hidden = self.transformer(input_ids, positions, ctx)
        if engine:
            return hidden
        if labels is not None and reduction == "sum":
            return token_logprob_sum(hidden, labels, self.lm_head, None, self.compute_logits,
                                     self.config.vocab_size)
        if labels is not None:
            return token_logprobs(hidden, labels, self.compute_logits, self.config.vocab_size)
        return self.lm_head(hidden)

    def compute_logits(self, hidden):
        return self.lm_head(hidden)

