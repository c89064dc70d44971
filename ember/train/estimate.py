"""Per-rank memory for a training config: the ZeRO paper's model-state formulas, and ember's own layout.

Psi = number of parameters, N = ranks. Mixed precision Adam (bf16, fp16), the paper's counts:
stage 0: 16 Psi; 1: 4 Psi + 12 Psi/N; 2: 2 Psi + 14 Psi/N; 3: 16 Psi/N.
fp32 Adam: 0: 16 Psi (4 params + 4 grads + 8 moments); 1: 8 Psi + 8 Psi/N; 2: 4 Psi + 12 Psi/N; 3: 16 Psi/N.
ember keeps fp32 master weights and grads in every precision (bf16/fp16 are compute dtypes), and
stages 2/3 are FSDP2, which keeps parameters sharded at rest: what ember holds between steps is
16 Psi (stage 0), 8 Psi + 8 Psi/N (stage 1) and 16 Psi/N (stages 2 and 3). The peak adds what FSDP
gathers during a step (stage 2: every layer's parameters in the compute dtype, from forward to
backward; stage 3: about two layers'), the activations and one chunk of the loss's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.train.config import TrainConfig

PAPER = {
    "bf16": {0: (16, 0), 1: (4, 12), 2: (2, 14), 3: (0, 16)},
    "fp16": {0: (16, 0), 1: (4, 12), 2: (2, 14), 3: (0, 16)},
    "fp32": {0: (16, 0), 1: (8, 8), 2: (4, 12), 3: (0, 16)},
}
EMBER = {0: (16, 0), 1: (8, 8), 2: (0, 16), 3: (0, 16)}  # (replicated, sharded) bytes per parameter


@dataclass
class Estimate:
    num_params: int
    ranks: int
    paper_bytes: int
    ember_bytes: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    gathered_bytes: int = 0  # unsharded parameters FSDP holds during forward/backward (stages 2, 3)
    host_bytes: int = 0  # what offload keeps in host memory instead of the device's (CUDA only)

    @property
    def peak_bytes(self) -> int:
        """The training peak per rank: model states, gathered parameters and activations."""
        return self.ember_bytes + self.gathered_bytes + self.activation_bytes

    @property
    def device_bytes(self) -> int:
        return self.peak_bytes - self.host_bytes


@dataclass
class LoRACounts:
    trainable: int  # adapter parameters
    quantizable: int  # base parameters in the decoder layers' projections (held int8/int4 under QLoRA)


def lora_counts(model_config, spec) -> LoRACounts:
    """Adapter and projection parameter counts of a LoRA config, from the model built on the meta device."""
    import torch

    from ember.models import model_class
    from ember.models.lora import add_trainable_lora, lora_targets

    with torch.device("meta"):
        model = model_class(model_config.architecture)(model_config)
        quantizable = sum(m.weight.numel() for m in {t.module for t in lora_targets(model).values()})
        add_trainable_lora(model, spec.r, spec.alpha, 0.0, spec.target_modules)
    return LoRACounts(sum(p.numel() for p in model.parameters() if p.requires_grad), quantizable)


# bytes per parameter of a frozen base projection: fp32, or int8 / int4 with a fp32 scale (and offset) per group
_FROZEN_BYTES = {None: 4.0, "int8": 1 + 4 / 64, "int4": 0.5 + 8 / 64}


def estimate(config: TrainConfig, num_params: int, ranks: int, hidden: int, layers: int, vocab: int,
             lora: LoRACounts | None = None) -> Estimate:
    config = config.for_world(ranks)  # the micro-batch, where it is derived from the global batch
    if lora is not None:
        return _estimate_lora(config, num_params, ranks, hidden, layers, vocab, lora)
    stage = config.zero_stage
    full, sharded = PAPER[config.precision][stage]
    paper = int(num_params * (full + sharded / ranks))
    full, sharded = EMBER[stage]
    ember = int(num_params * (full + sharded / ranks))
    shard = 1 if stage == 0 else ranks
    params = 4 * num_params // (ranks if stage >= 2 else 1)
    grads = 4 * num_params // (ranks if stage >= 2 else 1)
    optim = 8 * num_params // shard
    # FSDP all-gathers parameters in the compute dtype: stage 2 keeps every layer's from forward to
    # backward (reshard_after_forward=False), stage 3 about two layers' (the current one and the prefetch).
    width = 2 if config.precision in ("bf16", "fp16") else 4
    gathered = 0
    if stage == 2 and ranks > 1:
        gathered = width * num_params
    elif stage == 3 and ranks > 1:
        gathered = width * 2 * (num_params // max(1, layers))
    host = 0
    if config.offload_optimizer and config.device == "cuda":
        host += optim
    if config.offload_params and config.device == "cuda":
        host += params + grads
    return Estimate(num_params, ranks, paper, ember, params, grads, optim, _activations(config, hidden, layers, vocab),
                    gathered, host)


def _activations(config: TrainConfig, hidden: int, layers: int, vocab: int) -> int:
    """Activations per micro-batch (Korthikanti et al., flash attention: ~34 s*b*h bytes per layer in
    16-bit, twice that in fp32), plus the loss's logits: one chunk of them and its gradient at a time
    (ember.models.loss), never the whole [tokens, vocab]."""
    from ember.models.loss import CHUNK_LOGITS

    tokens = config.micro_batch_size * config.data.seq_len
    width = 2 if config.precision in ("bf16", "fp16") else 4
    per_layer = 34 * tokens * hidden * width // 2
    if config.activation_checkpointing:
        per_layer = tokens * hidden * width
    return layers * per_layer + 3 * min(tokens * vocab, CHUNK_LOGITS) * 4


def _estimate_lora(config: TrainConfig, num_params: int, ranks: int, hidden: int, layers: int, vocab: int,
                   lora: LoRACounts) -> Estimate:
    """The frozen base (fp32, or its projections int8/int4 under QLoRA) plus the adapter's weights, grads
    and Adam moments (16 bytes each), each sharded as the stage shards them."""
    stage = config.zero_stage
    frozen = (num_params - lora.quantizable) * 4 + lora.quantizable * _FROZEN_BYTES[config.lora.base_quantization]
    params = int(frozen + 4 * lora.trainable) // (ranks if stage >= 2 else 1)
    grads = 4 * lora.trainable // (ranks if stage >= 2 else 1)
    optim = 8 * lora.trainable // (1 if stage == 0 else ranks)
    ember = params + grads + optim
    return Estimate(num_params + lora.trainable, ranks, ember, ember, params, grads, optim,
                    _activations(config, hidden, layers, vocab))


def report(e: Estimate, stage: int, precision: str) -> str:
    gib = lambda b: f"{b / 2**30:8.3f} GiB"  # noqa: E731
    return "\n".join([
        f"parameters: {e.num_params:,}  ranks: {e.ranks}  zero_stage: {stage}  precision: {precision}",
        f"  model states, ZeRO paper formula: {gib(e.paper_bytes)} per rank",
        f"  model states, as ember holds them: {gib(e.ember_bytes)} per rank "
        f"(params {gib(e.params_bytes).strip()}, grads {gib(e.grads_bytes).strip()}, "
        f"optimizer {gib(e.optimizer_bytes).strip()})",
        f"  parameters gathered by FSDP in forward/backward: {gib(e.gathered_bytes)}",
        f"  activations per micro-batch (approx.): {gib(e.activation_bytes)}",
        f"  peak per rank (ember, approx.): {gib(e.peak_bytes)}"
        + (f" ({gib(e.device_bytes).strip()} on the GPU, {gib(e.host_bytes).strip()} offloaded to host memory)"
           if e.host_bytes else ""),
    ])
