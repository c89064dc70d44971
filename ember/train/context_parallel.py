"""Context parallelism: one sequence longer than a rank can hold trains across a group of ranks.

DeepSpeed-Ulysses. The world is split into groups of `context_parallel` consecutive ranks; every rank
of a group reads the same sequences and keeps its own T/N consecutive tokens of each (with their
global positions for rotary). Everything but attention is token-local, so each rank runs embeddings,
norms, MLPs, the LM head and the loss on its slice only; MoE routers' load-balancing statistics (means
over the tokens) are averaged over the group (`MoE.token_group`). Around attention an all-to-all turns
q/k/v [B, T/N, heads, D] into [B, T, heads/N, D]: each rank attends over the whole sequence with a
slice of the heads (plain causal SDPA, sliding windows, soft-caps and sinks unchanged), and the
inverse all-to-all brings its tokens' outputs of every head back. The all-to-alls are
torch.distributed.nn's differentiable ones, so backward moves the gradients the same way.

Why not torch's `context_parallel` (ring attention, torch.distributed.tensor.experimental): it
replaces the CUDA SDPA kernels (flash, efficient, cuDNN) only; on CPU SDPA runs
`_scaled_dot_product_flash_attention_for_cpu`, which it does not handle, and it has no path for
soft-capped or sink attention (ember's `attention_math`). Ulysses wraps whatever attention ember
already computes, needs no load balancing for the causal mask (every rank attends over all tokens),
and costs two all-to-alls of q/k/v/out per layer. Its limit: heads must divide over the group (K/V
heads are repeated up to the query heads when they do not).

Gradients: parameters are replicated; a group's gradient is the sum of its ranks' gradients (each
rank's loss covers its own tokens, divided by the labels of the whole micro-batch). DDP averages over
all world ranks (FSDP2's reduce-scatter too, so any ZeRO stage works), so each rank's loss is scaled by
the group size: the average is then the mean over the data-parallel replicas of each group's summed
gradient, as one process computes it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from ember.models.attention import DocumentMask, attend, document_context
from ember.train.config import ConfigError, TrainConfig


def check_context_parallel(config: TrainConfig, model_config, world_size: int) -> None:
    """Everything that rules out `context_parallel: N` for this run, as a ConfigError."""
    n = config.context_parallel
    problems = [
        (world_size % n == 0, f"{world_size} processes do not split into groups of {n}"),
        (config.data.seq_len % n == 0, f"data.seq_len {config.data.seq_len} does not split into {n} slices"),
        (model_config.num_heads % n == 0, f"{model_config.num_heads} attention heads do not divide over {n} ranks"),
        (not config.expert_parallel, "expert_parallel: not combined with context parallel yet"),
    ]
    for ok, why in problems:
        if not ok:
            raise ConfigError(f"context_parallel: {n}: {why}")


class UlyssesAttention:
    """Attention.context_parallel: q/k/v of this rank's tokens -> its tokens' attention outputs, every head."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.documents: DocumentMask | None = None  # the whole windows' (`data.packing: documents`), per forward

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int | None,
                 softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        heads, kv_heads = q.shape[2], k.shape[2]
        if kv_heads % self.size:  # too few K/V heads to split: each query head gets its own copy
            k, v = k.repeat_interleave(heads // kv_heads, 2), v.repeat_interleave(heads // kv_heads, 2)
        q, k, v = (self._heads_to_sequence(t) for t in (q, k, v))
        if sinks is not None:
            local = heads // self.size
            sinks = sinks[self.rank * local:(self.rank + 1) * local]
        if self.documents is None:
            out = attend(q, k, v, scale, 0, None, sliding_window, softcap, sinks)
        else:
            out = self.documents.attend(0, q, k, v, scale, sliding_window, softcap, sinks)
        return self._sequence_to_heads(out)

    def _heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T/N, H, D] (my tokens, all heads) -> [B, T, H/N, D] (all tokens, my heads)."""
        b, s, h, d = x.shape
        send = x.reshape(b, s, self.size, h // self.size, d).permute(2, 0, 1, 3, 4).contiguous()
        received = all_to_all_single(torch.empty_like(send), send, group=self.group)  # [source rank = slice, ...]
        return received.permute(1, 0, 2, 3, 4).reshape(b, self.size * s, h // self.size, d)

    def _sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H/N, D] -> [B, T/N, H, D]: the inverse of _heads_to_sequence."""
        b, t, h, d = x.shape
        send = x.reshape(b, self.size, t // self.size, h, d).transpose(0, 1).contiguous()
        received = all_to_all_single(torch.empty_like(send), send, group=self.group)  # [source rank = heads, ...]
        return received.permute(1, 2, 0, 3, 4).reshape(b, t // self.size, self.size * h, d)


class ContextParallel:
    """This rank's place: group `rank // size` of consecutive ranks, slice `rank % size` of each sequence."""

    def __init__(self, size: int, rank: int, world: int):
        self.size, self.rank = size, rank % size
        self.data_rank, self.data_world = rank // size, world // size
        groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(self.data_world)]
        self.group = groups[self.data_rank]  # (every rank creates every group, in the same order)
        self.attentions: list[UlyssesAttention] = []  # (apply)

    def apply(self, model: nn.Module) -> None:
        """Route every attention layer's training forward through Ulysses over this group."""
        layers = [m for m in model.modules() if hasattr(m, "context_parallel")]
        if not layers:
            raise ConfigError(f"context_parallel: {type(model).__name__} has no attention layers that support it")
        self.attentions = [UlyssesAttention(self.group, self.rank, self.size) for _ in layers]
        for layer, attention in zip(layers, self.attentions):
            layer.context_parallel = attention
        for module in model.modules():  # MoE routers: load-balancing statistics over the whole sequences
            if hasattr(module, "token_group"):
                module.token_group = self.group

    def shard(self, inputs: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's slice of a micro-batch [B, T]: (inputs, labels, positions), each [B, T/N]. With the
        windows' `document_ids` [B, T] (`data.packing: documents`) positions restart at each document and
        the attention layers get the whole windows' block-causal mask (after the all-to-all each rank
        attends over every token, so the mask is the one-process one); else positions run 0..T-1."""
        if inputs.shape[1] % self.size:  # (DPO's batches are as wide as their longest row): unlabelled padding
            pad = self.size - inputs.shape[1] % self.size
            inputs, labels = F.pad(inputs, (0, pad)), F.pad(labels, (0, pad), value=-100)
            if document_ids is not None:
                document_ids = torch.cat([document_ids, document_ids[:, -1:].expand(-1, pad)], dim=1)
        length = inputs.shape[1] // self.size
        start = self.rank * length
        if document_ids is None:
            positions, documents = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs), None
        else:
            positions, documents = document_context(document_ids)
        for attention in self.attentions:
            attention.documents = documents
        end = start + length
        return inputs[:, start:end], labels[:, start:end], positions[:, start:end]
