"""`compile: true`: each transformer block runs under torch.compile (inductor), as torchtitan compiles.

One block at a time, not the whole model: the blocks share one graph (every layer's parameters are inputs
to it), the embedding, rotary tables, document masks and the chunked LM head + loss stay eager Python, and
nothing ZeRO does crosses a compiled region. The trainer compiles after activation checkpointing is set
(a checkpointed block recomputes its compiled forward in backward) and before DDP or FSDP2's
`fully_shard` wrap the blocks (their hooks run outside the compiled code), so every ZeRO stage, LoRA,
QLoRA's dequantized base, `data.packing: documents`, DPO (its `reference: live` copy stays eager) and
fp32/bf16/fp16 compose with it. `module.compile()` keeps the module and its parameter names, so checkpoints
are the same with and without it.

Compilation is lazy: the first training step traces and compiles forward and backward (the trainer logs
it and how long the step took); the first evaluation compiles the no-grad graph once more, and a smaller
last batch makes the batch size dynamic (one more compile, then none). Inside a compiled region ember's
CPU kernels step aside (ember.models.cpu_ops) so the graph never breaks on them.

Where it pays: see BENCHMARKS.md (Training 2). Refused (a ConfigError before any process starts) where
the blocks would not really compile: context and expert parallelism (torch.distributed.nn's all-to-all
raises under tracing, so Dynamo runs the whole block eagerly) and Mixture-of-Experts models (tokens per
expert are data-dependent: graph breaks in every MoE layer and a recompile whenever the counts change).
"""

from __future__ import annotations

import logging

from torch import nn

from ember.train.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


def check_compile(config: TrainConfig, model_config) -> None:
    """A ConfigError for each combination `compile: true` does not run well (preflight calls it)."""
    if not config.compile:
        return
    experts = model_config.raw.get("num_local_experts") or model_config.raw.get("num_experts")
    problems = [
        (config.context_parallel == 1, f"context_parallel: {config.context_parallel}: torch.distributed.nn's "
                                       "all-to-all inside attention cannot be traced, so every block would fall "
                                       "back to eager"),
        (not config.expert_parallel, "expert_parallel: torch.distributed.nn's all-to-all of the experts cannot be "
                                     "traced"),
        (not experts, f"{model_config.architecture} (Mixture-of-Experts): the tokens each expert gets are "
                      "data-dependent, so every MoE layer breaks the graph and recompiles as the counts change"),
    ]
    for ok, why in problems:
        if not ok:
            raise ConfigError(f"compile: true is not supported with {why}; set compile: false")


def compile_blocks(model: nn.Module, log: bool = True) -> int:
    """torch.compile each of the model's transformer blocks in place; returns how many (`log`: say so)."""
    blocks = list(model.blocks())
    for block in blocks:
        block.compile()
    if log:
        logger.info("compile: %d transformer blocks run under torch.compile (inductor); the first step traces "
                    "and compiles them (tens of seconds on a CPU), the first evaluation once more", len(blocks))
    return len(blocks)
