"""Per-rank memory of a training config: the ZeRO paper's model-state formulas, and ember's own peak.

Psi = number of parameters, N = ranks. Mixed precision Adam (bf16, fp16), the paper's counts:
stage 0: 16 Psi; 1: 4 Psi + 12 Psi/N; 2: 2 Psi + 14 Psi/N; 3: 16 Psi/N.
fp32 Adam: 0: 16 Psi (4 params + 4 grads + 8 moments); 1: 8 Psi + 8 Psi/N; 2: 4 Psi + 12 Psi/N; 3: 16 Psi/N.
ember keeps fp32 master weights and grads in every precision (bf16/fp16 are compute dtypes), and
stages 2/3 are FSDP2, which keeps parameters sharded at rest: the model states ember holds are
16 Psi (stage 0), 8 Psi + 8 Psi/N (stage 1) and 16 Psi/N (stages 2 and 3).

The peak is more than the model states. A step goes through phases, each holding something of its
own on top of what stays resident (the parameters and optimizer state as the stage keeps them, DDP's
gradient buckets, the process's runtime):
- forward, at the loss: every block's saved activations, the LM-head loss's buffers and one chunk of
  its logits, the parameters FSDP holds gathered, autocast's 16-bit weight copies (stages 0/1);
- backward, at the loss's backward: the same with the head's new gradient instead of the chunk;
  stage 3 first gathers the root (embeddings, head) again;
- backward's end: every gradient (DDP), or the root's unsharded gradients in FSDP's reduce-scatter;
- the optimizer step: the gradients and Adam's temporaries;
- start-up: building and sharding the model.
`estimate` adds up each phase from the model's shapes (the model built on the meta device) and what
the code allocates (ember.train.zero, ember.models.loss, torch's DDP, FSDP2 and Adam); the peak is the
largest phase. That is the live peak: CUDA's `max_memory_allocated`, and a CPU run's resident set
(its anonymous memory: mapped library pages left out) when the C allocator hands freed memory back
(ALLOCATOR_NOTE). Measured against training runs of
every stage in BENCHMARKS.md ("ember train estimate vs measured").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.train.config import TrainConfig

MiB = 1 << 20

PAPER = {
    "bf16": {0: (16, 0), 1: (4, 12), 2: (2, 14), 3: (0, 16)},
    "fp16": {0: (16, 0), 1: (4, 12), 2: (2, 14), 3: (0, 16)},
    "fp32": {0: (16, 0), 1: (8, 8), 2: (4, 12), 3: (0, 16)},
}

# What a training process allocates beyond its tensors once it has run a step, over what it held before
# the model was built: DDP's/FSDP's and gloo's state, autograd's and the threads' bookkeeping. Counted as
# the trainer measures (anonymous memory: the file pages a run maps, ~22 MiB of libtorch's code that
# backward and the optimizer touch first, are left out: how many a first call maps depends on what the
# page cache holds, and one CI run measured them twice as large). Measured (fixed mmap threshold, see
# ALLOCATOR_NOTE): `ember train` of a 0.1M-parameter model implies 14-17 MiB on 2 processes, stages 0-3.
RUNTIME_BYTES = 16 * MiB

ALLOCATOR_NOTE = (
    "on CPU this is the live peak; glibc's default malloc raises its mmap threshold as large blocks "
    "are freed and then keeps freed blocks under 32 MiB in its heap, so the resident set can be "
    "8-65% higher (MALLOC_MMAP_THRESHOLD_=131072 makes it return them; BENCHMARKS.md)")

# Optimizer state, bytes per trainable parameter (SGD: 4 with momentum)
OPTIMIZER_STATE = {"adamw": 8, "adam": 8, "lion": 4, "sgd": 0}


@dataclass
class Estimate:
    num_params: int
    ranks: int
    paper_bytes: int
    ember_bytes: int  # model states as ember holds them: params + grads + optimizer state
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # the blocks' saved activations at forward's end
    gathered_bytes: int = 0  # unsharded parameters FSDP holds at forward's end (stages 2, 3)
    host_bytes: int = 0  # what offload keeps in host memory instead of the device's (CUDA only)
    buffer_bytes: int = 0  # DDP's gradient buckets (stages 0/1 on several ranks)
    loss_bytes: int = 0  # the LM-head loss's buffers at forward's end (ember.models.loss)
    runtime_bytes: int = 0  # RUNTIME_BYTES
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> term -> bytes
    host_terms: frozenset[str] = frozenset()  # the phases' terms offload keeps in host memory

    @property
    def peak_bytes(self) -> int:
        """The training peak per rank: the largest phase."""
        return max(sum(terms.values()) for terms in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def device_bytes(self) -> int:
        """The peak on the device when offload keeps `host_terms` in host memory."""
        return max(sum(v for k, v in terms.items() if k not in self.host_terms) for terms in self.phases.values())


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


@dataclass(frozen=True)
class Shapes:
    """What the formulas need of a model, read off the model built on the meta device."""

    num_params: int
    hidden: int
    vocab: int
    layers: int
    block_params: int  # the largest block's parameters (the unit FSDP gathers and reduce-scatters)
    root_params: int  # the rest (embeddings, an untied LM head, the final norm): FSDP's root group
    largest_param: int  # elements of the largest parameter tensor
    block_linear_weights: int  # the blocks' matmul weights (autocast casts each to 16 bits)
    head: int  # elements of the LM head's weight (vocab x hidden)
    layer_bytes_per_token: tuple[int, int]  # a block's saved activations per token: (16-bit, fp32) compute
    rest_bytes_per_token: int  # outside the blocks: the final norm, rotary tables, token ids


def model_shapes(model_config) -> Shapes:
    """The shapes of `model_config`'s model (a ModelConfig), built on the meta device."""
    import torch

    from ember.models import model_class

    with torch.device("meta"):
        model = model_class(model_config.architecture)(model_config)
    blocks = list(model.blocks())
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    params = list(model.parameters())  # (a tied head is one parameter)
    linear = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    mc = model_config
    return Shapes(
        num_params=sum(p.numel() for p in params), hidden=mc.hidden_size, vocab=mc.vocab_size, layers=len(blocks),
        block_params=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        root_params=sum(p.numel() for p in params if id(p) not in in_blocks),
        largest_param=max(p.numel() for p in params), block_linear_weights=linear,
        head=mc.vocab_size * mc.hidden_size,
        layer_bytes_per_token=(_layer_bytes_per_token(mc, 2), _layer_bytes_per_token(mc, 4)),
        rest_bytes_per_token=_rest_bytes_per_token(mc))


def _layer_bytes_per_token(mc, width: int) -> int:
    """What autograd saves for one decoder block, per token, computing in `width`-byte floats (counted
    with saved-tensor hooks on ember's Llama block; tests/train/test_estimate.py):
    - each RMSNorm: its input and normalized input in fp32 (F.rms_norm computes in fp32) and its output
      in the compute dtype (the next matmul's input), 8 h + w h, and 4 bytes of 1/rms;
    - attention: the qkv projection's output (q + 2 kv: v is a view of it, so all of it stays), the
      rotated q|k (q + kv), the attention output (q), and flash attention's log-sum-exp (4 bytes a head);
    - the gated MLP: gate|up (2 i), act(gate) (i) and the product (i), the down projection's input.
    Gemma's sandwich norms count 4 norms; a MoE block's MLP runs top-k experts per token."""
    h, d = mc.hidden_size, mc.head_dim
    q, kv = mc.num_heads * d, mc.num_kv_heads * d
    norms = 4 if mc.family.norm == "sandwich" else 2
    inter = mc.intermediate_size
    if mc.family.moe:
        raw = mc.raw
        inter = int(raw.get("moe_intermediate_size") or inter) * int(raw.get("num_experts_per_tok", 2))
        inter += int(raw.get("shared_expert_intermediate_size") or 0)
    return norms * ((8 + width) * h + 4) + width * (3 * q + 3 * kv + 4 * inter) + 4 * mc.num_heads


def _rest_bytes_per_token(mc) -> int:
    """Outside the blocks: the final norm's fp32 input and normalized input, the cos/sin tables (at
    most fp32) and the token ids."""
    return 8 * mc.hidden_size + 4 + 2 * 4 * mc.head_dim + 16


def estimate(config: TrainConfig, model_config, ranks: int, lora: LoRACounts | None = None) -> Estimate:
    """Per-rank memory of `config` on `ranks` processes for the model `model_config` (a ModelConfig)."""
    from ember.train.zero import training_device

    config = config.for_world(max(1, ranks // config.context_parallel))  # the micro-batch of the run
    try:  # `device: auto`: what a run on this machine would use
        device = training_device(config.device, ranks)
    except ValueError:  # device: cuda, with too few GPUs here: estimate the run it describes
        device = "cuda"
    return _estimate(config, model_shapes(model_config), ranks, lora, device)


def _estimate(c: TrainConfig, s: Shapes, ranks: int, lora: LoRACounts | None, device: str) -> Estimate:
    stage, n = c.zero_stage, ranks
    psi = s.num_params
    half = c.precision in ("bf16", "fp16")
    w = 2 if half else 4  # bytes of the compute dtype
    fsdp = stage >= 2  # FSDP2 (one process too: it copies the "gathered" parameters out of the shards)
    ddp = stage <= 1 and n > 1  # ember.train.zero: one process trains the bare model
    param_w = w if fsdp else 4  # FSDP2's MixedPrecisionPolicy gathers in the compute dtype

    # ---- model states (what stays between steps) ---------------------------------------------------
    trainable = psi if lora is None else lora.trainable
    shard = n if fsdp else 1
    if lora is None:
        params = 4 * psi // shard
    else:
        frozen = (psi - lora.quantizable) * 4 + lora.quantizable * _FROZEN_BYTES[c.lora.base_quantization]
        params = int(frozen + 4 * lora.trainable) // shard
    grads = 4 * trainable // shard
    optim = OPTIMIZER_STATE[c.optimizer.type] * trainable // (1 if stage == 0 else n)
    if c.optimizer.type == "sgd" and c.optimizer.momentum:
        optim = 4 * trainable // (1 if stage == 0 else n)
    full, sharded = PAPER[c.precision][stage]
    paper = int(psi * (full + sharded / n)) if lora is None else params + grads + optim
    # DDP's reducer keeps its own flat copy of every gradient (its buckets; gradient_as_bucket_view is
    # off), allocated when the model is wrapped and kept for the whole run.
    buckets = 4 * trainable if ddp else 0
    # DPO's `reference: live` keeps a frozen copy of the whole model on every rank.
    reference = 4 * psi if c.objective == "dpo" and c.dpo.reference == "live" and lora is None else 0
    resident = {"params": params, "optimizer state": optim, "runtime": RUNTIME_BYTES}
    if buckets:
        resident["DDP gradient buckets"] = buckets
    if reference:
        resident["DPO reference model"] = reference

    # ---- activations --------------------------------------------------------------------------------
    tokens = c.micro_batch_size * c.data.seq_len // c.context_parallel * (2 if c.objective == "dpo" else 1)
    per_layer = tokens * s.layer_bytes_per_token[0 if half else 1]
    rest = tokens * s.rest_bytes_per_token
    if c.activation_checkpointing:
        # each block keeps only its input (the residual stream: fp32 under autocast, else the compute
        # dtype); backward recomputes one block at a time, whose activations then live until its backward
        residual = 4 if not fsdp else w
        activations = s.layers * tokens * s.hidden * residual + per_layer + rest
    else:
        activations = s.layers * per_layer + rest
    # Autocast (stages 0/1 in bf16/fp16) caches a 16-bit copy of each weight it casts and the matmuls
    # save it for backward: every block's weights, from forward until the block's backward.
    casts = 2 * s.block_linear_weights if half and not fsdp else 0

    # ---- the LM head's loss (ember.models.loss) -----------------------------------------------------
    from ember.models import fp32_matmul
    from ember.models.loss import CHUNK_LOGITS

    chunk = min(tokens, max(1, CHUNK_LOGITS // s.vocab)) * s.vocab  # logits per chunk
    head_trainable = lora is None
    if c.objective == "dpo":
        # token_logprobs: per chunk its fp32 logits and logsumexp's temporary of their size (forward, and the
        # recompute in backward); in backward then the logits and their gradient
        loss_saved, loss_forward, loss_backward = 0, 2 * 4 * chunk, 2 * 4 * chunk
    else:
        # token_logprob_sum computes the gradients in forward: the head weight's gradient is an fp32
        # [vocab, hidden] buffer from forward to backward (and the hidden states' one, [tokens, hidden]).
        # Per chunk one fp32 buffer (logits, then softmax, then gradient, in place); in 16 bits also the
        # product's 16-bit output or the gradient's 16-bit copy; under autocast a 16-bit copy of the
        # head weight for the whole loop.
        loss_saved = (4 * s.head if head_trainable else 0) + tokens * s.hidden * w
        loss_forward = chunk * (6 if half else 4) + (2 * s.head if casts else 0)
        # backward scales the buffer into a new fp32 tensor (the head's gradient), cast to the
        # parameter's dtype where FSDP gathered it in 16 bits
        loss_backward = (4 * s.head + (s.head * param_w if param_w != 4 else 0)) if head_trainable else 0

    # oneDNN's float32 products on a CPU (ember.models.fp32_matmul) copy a transposed first operand into
    # their own layout: in a block's backward the weight gradient's narrower operand (tokens x hidden: the
    # narrow side of every block product); in the fused loss, per slice of the head's gradient, that slice
    # and its copy of the logits' gradient (fp32_matmul.add_matmul_tn).
    if device == "cpu" and not half and fp32_matmul.available():
        block_scratch = 4 * tokens * s.hidden
        chunk_rows = chunk // s.vocab
        if c.objective != "dpo" and head_trainable:
            step = min(s.vocab, fp32_matmul.slice_rows(s.hidden, chunk_rows))
            loss_forward += 4 * step * (s.hidden + chunk_rows)
        elif head_trainable:  # the per-token path's head gradient (fp32_matmul.matmul_tn): the cheaper copy
            loss_backward += 4 * min(chunk, s.head + chunk_rows * s.hidden)
    else:
        block_scratch = 0

    # ---- FSDP's gathered parameters and buffers (stages 2/3, torch.distributed.fsdp._fully_shard) -----
    root_gathered = s.root_params * param_w if fsdp else 0
    root_grads = 4 * s.root_params if fsdp and lora is None else 0  # (LoRA: the root is frozen)
    # A group's parameters are gathered (in the compute dtype) when its forward starts. Stage 2 keeps
    # every group gathered until its backward (reshard_after_forward=False): at the loss the root
    # (embeddings, head, final norm) and every block are there. Stage 3 frees each after its forward,
    # the root's too: at the loss only the root is there, and backward starts by gathering it again,
    # through a flat all-gather buffer of its size that lives until the copy-out into the parameters
    # (on one process FSDP2 copies the shard straight into the parameters).
    gathered_forward = root_gathered + (s.layers * s.block_params * param_w if stage == 2 else 0)
    regather = root_gathered * (2 if n > 1 else 1) if stage == 3 else 0
    # Backward's end: FSDP2 reduces the root last, after resharding its parameters: its unsharded
    # gradients (head and embeddings, in the parameters' dtype) are copied into the reduce-scatter's
    # fp32 input, whose output becomes the root's gradient shards (every block's are there already).
    # On a CPU, gloo's reduce-scatter (and all-gather) works on a scratch copy of the whole input
    # (measured: +128 MiB for a 128 MiB input); NCCL needs none. DDP: every gradient.
    if fsdp:
        scratch = root_grads if device == "cpu" and n > 1 else 0
        reduce_end = root_grads // 4 * param_w + root_grads + scratch
        grads_at_end = grads - root_grads // shard
    else:
        reduce_end, grads_at_end = 0, 4 * trainable

    # Gradient accumulation: between micro-batches the gradients stay (DDP's param.grad; FSDP keeps
    # the unsharded ones, in fp32, as no reduce-scatter runs until the last micro-batch).
    grads_between = 4 * trainable if c.grad_accum and c.grad_accum > 1 else 0

    # ---- the optimizer step -----------------------------------------------------------------------
    # torch's Adam runs per tensor on a CPU (foreach kernels are CUDA's): the denominator takes two
    # temporaries of the largest parameter's (shard's) size; on CUDA the foreach step's sqrt makes one
    # of the whole group (every matrix). Lion: one of the largest; SGD: none. (LoRA: the adapters'
    # total stands for their largest tensor.)
    offloaded = (c.offload_optimizer or c.offload_params) and device == "cuda" and fsdp
    largest_local = s.largest_param // shard if lora is None else lora.trainable // shard
    if c.optimizer.type in ("adam", "adamw"):
        foreach = device == "cuda" and not offloaded
        step_temps = 4 * (trainable // shard) if foreach else 2 * 4 * largest_local
        if c.optimizer.type == "adam" and c.optimizer.weight_decay:
            step_temps += 4 * largest_local  # (the L2 term: grad + wd * param, a new tensor)
    elif c.optimizer.type == "lion":
        step_temps = 4 * largest_local
    else:
        step_temps = 0

    # ---- the phases -------------------------------------------------------------------------------
    held = {**resident, "accumulated gradients": grads_between, "autocast weight copies": casts,
            "activations": activations}  # from the forward of the blocks until their backward
    phases = {
        "forward": {**held, "gathered parameters": gathered_forward, "loss buffers": loss_saved + loss_forward},
        "backward": {**held, "gathered parameters": gathered_forward, "loss buffers": loss_saved + loss_backward,
                     "matmul scratch": block_scratch},
        "root re-gather": {**held, "gathered parameters": regather, "loss buffers": loss_saved},
        "backward end": {**resident, "grads": grads_at_end, "reduce-scatter buffers": reduce_end},
        "optimizer step": {**resident, "grads": grads, "optimizer temporaries": step_temps},
    }
    if fsdp and lora is None and not c.expert_parallel:
        # ember.train.sharded_init: each rank builds its shard, one full tensor at a time
        phases["start-up"] = {"params": params, "one full parameter": 4 * s.largest_param}
    else:
        phases["start-up"] = {"params": params * shard, "DDP gradient buckets": buckets}
    if not regather:
        del phases["root re-gather"]
    phases = {name: {k: v for k, v in terms.items() if v} for name, terms in phases.items()}

    # ---- offload (CUDA): FSDP2's CPUOffloadPolicy (ember passes it for either offload flag) keeps the
    # sharded params, their grads and the optimizer state in host memory, and the step runs there
    host_terms = frozenset({"params", "grads", "optimizer state", "optimizer temporaries"} if offloaded else ())
    host = params + grads + optim + step_temps if offloaded else 0

    return Estimate(psi, n, paper, params + grads + optim, params, grads, optim, activations, gathered_forward,
                    host, buckets, loss_saved + loss_forward, RUNTIME_BYTES, phases, host_terms)


def report(e: Estimate, stage: int, precision: str) -> str:
    def gib(b: int) -> str:
        return f"{b / 2**30:8.3f} GiB"

    lines = [
        f"parameters: {e.num_params:,}  ranks: {e.ranks}  zero_stage: {stage}  precision: {precision}",
        f"  model states, ZeRO paper formula: {gib(e.paper_bytes)} per rank",
        (f"  model states, as ember holds them: {gib(e.ember_bytes)} per rank "
         f"(params {gib(e.params_bytes).strip()}, grads {gib(e.grads_bytes).strip()}, "
         f"optimizer {gib(e.optimizer_bytes).strip()})"),
    ]
    if e.buffer_bytes:
        lines.append(f"  DDP gradient buckets: {gib(e.buffer_bytes)}")
    lines += [
        f"  parameters gathered by FSDP in forward: {gib(e.gathered_bytes)}",
        f"  activations per micro-batch: {gib(e.activation_bytes)}",
        f"  LM-head loss buffers: {gib(e.loss_bytes)}",
        "  phases (per rank):",
    ]
    for name, terms in e.phases.items():
        parts = ", ".join(f"{k} {v / 2**30:.3f}" for k, v in terms.items())
        lines.append(f"    {name:15s}{gib(sum(terms.values()))}  ({parts})")
    offload = (f" ({gib(e.device_bytes).strip()} on the GPU, {gib(e.host_bytes).strip()} offloaded to host memory)"
               if e.host_bytes else "")
    lines.append(f"  peak per rank (ember): {gib(e.peak_bytes)} at the {e.peak_phase}{offload}")
    lines.append(f"  ({ALLOCATOR_NOTE})")
    return "\n".join(lines)
