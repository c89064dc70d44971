"""LlamaForCausalLM: the one decoder class of every Llama-family architecture ember loads (Llama 1-3,
Qwen2/3 and their MoE, Mistral, Mixtral, Gemma 2/3, Phi-3/4, OLMo 2, SmolLM3, gpt-oss; see
ember.models.ARCHITECTURES).

Where a family differs from Llama, `ModelConfig` has already turned it into data (its `Family` and
per-layer `LayerSpec`s: sliding windows, rope or none, q/k norms, norm placement, soft-capping, sinks,
MoE routing), which `DecoderLayer` reads; this file holds the stack around the layers: the embedding
(Gemma's scaled), one `Rotary` per distinct rope of the layers, the final norm and the LM head (tied or
not, Gemma 2's logit soft-capping).

`forward` serves both users of the model: training passes `input_ids[B, T]` and gets logits (with
optional activation checkpointing per block); the engine passes flat tokens, their positions and an
`AttentionContext` and gets hidden rows, computing logits only for the rows it samples. For the
engine's batches on CPU, `LlamaModel` checks per batch whether its layers can run as one Python frame
each over ember's fused kernels (`DecoderLayer.forward_cpu_rows` for bf16 batches in the pair-packed
kernels' row range, `forward_rows` for the rest the kernels cover) and otherwise calls the modules;
either way the results are the same.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ember.models import cpu_ops
from ember.models.attention import AttentionContext, DocumentMask, document_context
from ember.models.config import ModelConfig
from ember.models.layers import DecoderLayer, Linear, RMSNorm, Rotary, make_norm
from ember.models.loss import token_logprob_sum, token_logprobs


_version = operator.attrgetter("_version")


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)
        self.embed_scale = config.hidden_size**0.5 if config.family.embed_scale else None  # Gemma
        # One Rotary per distinct (rope, rotated width) of the layers; each layer reads its own tables
        # (Gemma 3's local and global layers differ, SmolLM3's NoPE layers have none).
        keys = [(spec.rope, spec.rotary_dim or config.head_dim) if spec.rope is not None else None
                for spec in config.layers]
        self.rotaries = {key: Rotary(*key) for key in dict.fromkeys(k for k in keys if k is not None)}
        self.layer_rotary = keys
        self.gradient_checkpointing = False  # training: recompute each block's activations in backward
        self._layers_take_cpu_rows: bool | None = None  # decided on the first engine batch
        self._layers_take_rows: dict[torch.dtype, bool] = {}
        self._stack_plan = None  # decode_stack: (layer indices, rotary key, plans, projection weights) or False
        self._stack_cache = None  # (the projections' weight versions, decode_stack's arguments or None)

    def forward(self, input_ids, positions, ctx: AttentionContext | None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:  # in the embeddings' dtype, as transformers rounds it
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        tables = {key: rotary(positions, x.dtype) for key, rotary in self.rotaries.items()}
        none = (None, None)
        # The engine's rows whose final hidden states it uses: the last layer runs past its K/V write for
        # them alone (see AttentionContext.output_rows), and only they are returned.
        keep = getattr(ctx, "output_rows", None)
        last = len(self.layers) - 1
        if ctx is not None and (step := self._cpu_rows(x) or self._rows(x)):
            if step is DecoderLayer.forward_cpu_rows and (out := self._decode_stack(x, tables, ctx)) is not None:
                return out
            delta = None
            for i, (layer, key) in enumerate(zip(self.layers, self.layer_rotary)):
                x, delta = step(layer, x, delta, *tables.get(key, none), ctx, keep if i == last else None)
            return self.norm.add_and_norm(x, delta)[1] if delta is not None else self.norm(x)
        for i, (layer, key) in enumerate(zip(self.layers, self.layer_rotary)):
            cos, sin = tables[key] if key is not None else none
            if self.gradient_checkpointing and self.training and (ctx is None or isinstance(ctx, DocumentMask)):
                x = checkpoint(layer, x, cos, sin, ctx, use_reentrant=False)
            elif i == last and keep is not None:
                x = layer(x, cos, sin, ctx, keep)
            else:
                x = layer(x, cos, sin, ctx)
        return self.norm(x)

    def _cpu_rows(self, x: torch.Tensor):
        """DecoderLayer.forward_cpu_rows if the layers take the engine's batch through it, else None."""
        # batch-invariant routing sends one or two rows through the pair-packed kernel too
        fewest = 1 if cpu_ops.batch_invariant_routing() else cpu_ops.GEMV_MAX_ROWS + 1
        if not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2
                and fewest <= x.shape[0] <= cpu_ops.PAIRS_MAX_ROWS and not torch.is_grad_enabled()):
            return None
        if self._layers_take_cpu_rows is None:
            self._layers_take_cpu_rows = cpu_ops.gemv_available() and all(layer.takes_cpu_rows() for layer in self.layers)
        return DecoderLayer.forward_cpu_rows if self._layers_take_cpu_rows else None

    def _decode_stack(self, x: torch.Tensor, tables: dict, ctx):
        """A decode-only step's layers and final norm in one C++ call (cpu_ops.cpp's decode_stack:
        forward_cpu_rows's kernels and bits without the Python between them): the final hidden rows, or None
        where it does not apply (layers with different rotary tables, attention other than cpu_paged's
        decode kernel)."""
        stack = self._stack_arguments()
        if stack is None or not hasattr(ctx, "decode_stack_args") or \
                (attention := ctx.decode_stack_args(self._stack_plan[0])) is None:
            return None
        cos, sin = tables[self._stack_plan[1]]
        if type(self.norm) is RMSNorm and self.norm.weight.dtype == x.dtype:  # the final norm inside the call too
            return torch.ops.ember_ops.decode_stack.default(x, cos, sin, *stack, *attention, self.norm.weight,
                                                            self.norm.eps)[1]
        return self.norm.add_and_norm(*torch.ops.ember_ops.decode_stack.default(x, cos, sin, *stack, *attention))[1]

    def _stack_arguments(self):
        """decode_stack's weights, biases, sizes, eps and scale, or None where it cannot run these layers.
        Assembled once, and again whenever a projection's weight changed in place (an RL push, which its
        packed copy follows): each torch op or Python loop here runs with the caches cold from the step's
        weights, ~20 us an op (a single stream's decode step is ~4 ms)."""
        if self._stack_plan is None:
            keys = set(self.layer_rotary)
            plans = [layer._cpu_rows_plan for layer in self.layers]
            usable = len(keys) == 1 and None not in keys and not self.layers[0].tp_reduce and \
                len({plan[5:9] for plan in plans}) == 1
            projections = [w for plan in plans for w in (plan[2], plan[11], plan[16], plan[19])]
            self._stack_plan = ([plan[9] for plan in plans], next(iter(keys)), plans, projections) if usable else False
        if self._stack_plan is False:
            return None
        plans = self._stack_plan[2]
        versions = list(map(_version, self._stack_plan[3]))
        if self._stack_cache is not None and self._stack_cache[0] == versions:
            return self._stack_cache[1]
        weights, biases, sizes, eps = [], [], list(plans[0][5:8]), []
        stack = (weights, biases, sizes, eps, plans[0][8])
        for (norm1, eps1, qkv_w, qkv_n, qkv_b, _, _, _, _, _, window, o_w, o_n, o_b, norm2, eps2,
             gate_up_w, gate_up_n, gate_up_b, down_w, down_n, down_b) in plans:
            # gate_up in linear_pairs_silu's layout (decode_stack's contract)
            packed = [cpu_ops._pairs(qkv_w), cpu_ops._pairs(o_w), cpu_ops._swiglu_pairs(gate_up_w), cpu_ops._pairs(down_w)]
            if any(p is None for p in packed):  # (not `None in packed`: that compares tensors with None)
                stack = None
                break
            weights += [norm1, packed[0], packed[1], norm2, packed[2], packed[3]]
            biases += [qkv_b, o_b, gate_up_b, down_b]
            sizes += [qkv_n, o_n, gate_up_n, down_n, window or 0]
            eps += [eps1, eps2]
        self._stack_cache = (versions, stack)
        return stack

    def _rows(self, x: torch.Tensor):
        """DecoderLayer.forward_rows if the layers take the engine's batch through it (fused elementwise
        kernels for x's dtype here, every projection with a rows function), else None."""
        if not (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= cpu_ops.PAIRS_MAX_ROWS
                and not torch.is_grad_enabled() and cpu_ops.elementwise_available(x.dtype)):
            return None
        if x.dtype not in self._layers_take_rows:
            self._layers_take_rows[x.dtype] = all(layer.takes_rows(x.dtype) for layer in self.layers)
        return DecoderLayer.forward_rows if self._layers_take_rows[x.dtype] else None


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.final_softcap = config.final_softcap  # Gemma 2: logits -> cap * tanh(logits / cap)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (the unit of sharding and of activation checkpointing)."""
        return self.model.layers

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.model.gradient_checkpointing = enabled

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        ctx: AttentionContext | None = None,
        labels: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        reduction: str = "none",
    ) -> torch.Tensor:
        """Training: `input_ids[B, T]` -> logits `[B, T, V]`, or with `labels[B, T]` the labels'
        log-probabilities `[B, T]` (0 where a label is -100) without the whole logits tensor; with
        `reduction="sum"` their sum, a scalar whose gradients skip recomputing the LM head (loss.py).
        Engine: flat `input_ids[N]`, `positions[N]`, `ctx` -> final hidden states `[N, H]`, or of
        `ctx.output_rows` alone when the context names them (the engine computes logits only for the rows
        it samples or scores).
        Windows packed with several documents (`data.packing: documents`) pass `document_ids[B, T]`:
        positions restart at each document and attention stays within it (`document_context`)."""
        engine = ctx is not None
        if document_ids is not None:
            positions, ctx = document_context(document_ids)
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        hidden = self.model(input_ids, positions, ctx)
        if engine:
            return hidden
        if labels is not None and reduction == "sum":
            return token_logprob_sum(hidden, labels, self.lm_head, self.final_softcap, self.compute_logits,
                                     self.config.vocab_size)
        if labels is not None:
            return token_logprobs(hidden, labels, self.compute_logits, self.config.vocab_size)
        return self.compute_logits(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
