"""Trainer: data -> forward -> loss -> backward -> clip -> step, with accumulation, on any ZeRO stage.

`Trainer(config).fit()` runs in one process or under torchrun (one Trainer per rank).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from tqdm.auto import tqdm

from ember.models import ModelConfig, load_model, model_class
from ember.models.loader import init_random_weights
from ember.tokenizer import Tokenizer
from ember.train.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from ember.train.config import ConfigError, TrainConfig
from ember.train.data import StepSampler, build_datasets
from ember.train.faults import disk_full, record_error, restart_count
from ember.train.optim import build_scheduler
from ember.train.precision import LossScaler
from ember.train.runlog import RunReport, check_tensorboard
from ember.train.zero import (
    Dist,
    autocast,
    init_distributed,
    model_state_bytes,
    no_grad_sync,
    shard_model,
)

logger = logging.getLogger(__name__)


def model_config_for(config: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    if config.model.path is not None:
        return ModelConfig.from_dir(config.model.path)
    hf = {"architectures": [config.model.architecture], "model_type": "llama", "vocab_size": tokenizer.vocab_size,
          "eos_token_id": tokenizer.eos_token_ids, "bos_token_id": tokenizer.bos_token_id,
          "torch_dtype": "float32", **config.model.config}
    return ModelConfig.from_hf(hf, source="model")


def preflight(config: TrainConfig, world_size: int) -> tuple[Tokenizer, ModelConfig]:
    """Everything that can be wrong with a run, checked before any process trains."""
    from ember.train.data import expand_files

    tokenizer_dir = config.model.tokenizer_dir
    tokenizer = Tokenizer(tokenizer_dir)
    model_config = model_config_for(config, tokenizer)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"model.vocab_size: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model_config.vocab_size} embeddings"
        )
    expand_files(config.data.train, "data.train")
    if config.data.eval:
        expand_files(config.data.eval, "data.eval")
    if config.expert_parallel:
        experts = model_config.raw.get("num_local_experts") or model_config.raw.get("num_experts")
        if not experts:
            raise ConfigError(f"expert_parallel: {model_config.architecture} has no Mixture-of-Experts layers")
        if int(experts) % world_size:
            raise ConfigError(f"expert_parallel: {experts} experts do not divide over {world_size} processes")
    if config.context_parallel > 1:
        from ember.train.context_parallel import check_context_parallel

        check_context_parallel(config, model_config, world_size)
    config.accumulation(world_size // config.context_parallel)  # raises if the batch does not divide
    if config.compile:
        from ember.train.compile import check_compile

        check_compile(config, model_config)
    check_tensorboard(config)
    return tokenizer, model_config


def build_model(config: TrainConfig, model_config: ModelConfig) -> nn.Module:
    if config.model.path is not None:
        model, _ = load_model(config.model.path, dtype="float32")
        if config.lora is not None:
            attach_lora(model, config)
        return model.train()
    with torch.device("meta"):  # (a sharded start draws the same values: ember.train.sharded_init)
        model = model_class(model_config.architecture)(model_config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    torch.manual_seed(config.seed)
    init_random_weights(model, config.model.init_std)
    return model.train()


def attach_lora(model: nn.Module, config: TrainConfig) -> list[str]:
    """Freeze the base (held int8/int4 for QLoRA) and attach trainable adapters."""
    from ember.models.lora import add_trainable_lora

    spec = config.lora
    if spec.base_quantization is not None:
        from ember.models.quant import QuantConfig, quantize_model

        quantize_model(model, QuantConfig(spec.base_quantization, lm_head=False, embeddings=False))
    torch.manual_seed(config.seed)  # the same A on every rank
    try:
        adapted = add_trainable_lora(model, spec.r, spec.alpha, spec.dropout, spec.target_modules, spec.use_rslora)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%d on %d modules: %d trainable parameters of %d (%.2f%%)%s", spec.r, len(adapted), trainable,
                total, 100 * trainable / total, f", base {spec.base_quantization}" if spec.base_quantization else "")
    return adapted


def _drop_records_after(metrics_file: Path, step: int) -> None:
    """Keep a metrics file's records up to `step` (each step logged once, whatever restarts there were)."""
    if not metrics_file.is_file():
        return
    def step_of(line: str) -> int | None:
        try:
            return json.loads(line).get("step", 0)
        except ValueError:  # a line half-written when the run died
            return None

    lines = metrics_file.read_text().splitlines()
    kept = [line for line in lines if line.strip() and (s := step_of(line)) is not None and s <= step]
    if len(kept) != len(lines):
        metrics_file.write_text("".join(line + "\n" for line in kept))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's latest complete checkpoint (what `checkpoints/latest` names), or None."""
    marker = Path(run_dir) / "checkpoints" / "latest"
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def current_memory_bytes(device: torch.device) -> int:
    """What the process holds now (CUDA: allocated; CPU: resident set), beside the peak, which on a CPU
    includes load-time copies (e.g. full-precision weights before QLoRA quantizes them)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # the high-water mark since the last reset_peak_memory (the process's life if never reset)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def file_backed_bytes(device: torch.device) -> int:
    """CPU: the resident pages that map files (libraries' code, mapped data) and shared memory. They count
    in the resident set and its peak, but are not what a run allocates: how many of a library's pages a
    first call maps depends on what the page cache holds, and the kernel can drop them at any time."""
    if device.type == "cuda":
        return 0
    try:
        with open("/proc/self/status") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("RssFile:", "RssShmem:")))
    except OSError:
        return 0


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark (Linux: /proc/self/clear_refs "5" resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.cp = None  # the context-parallel group (_setup), when config.context_parallel > 1

    # ---- pieces -----------------------------------------------------------------------
    def _setup(self) -> None:
        c = self.config
        self.d: Dist = init_distributed(c.device)
        self.tokenizer, self.model_config = preflight(c, self.d.world)
        # Context parallel: each group of ranks shares its sequences; data parallelism is over the groups.
        self.data_rank, self.data_world = self.d.rank, self.d.world
        if c.context_parallel > 1:
            from ember.train.context_parallel import ContextParallel

            self.cp = ContextParallel(c.context_parallel, self.d.rank, self.d.world)
            self.data_rank, self.data_world = self.cp.data_rank, self.cp.data_world
        c = self.config = c.for_world(self.data_world)  # a micro-batch derived from DeepSpeed's train_batch_size
        torch.manual_seed(c.seed)
        self.accum = c.accumulation(self.data_world)
        self.global_batch = c.global_batch(self.data_world)
        self.run_dir = Path(c.run_dir)
        if self.d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        cache = self.run_dir / "cache"
        datasets = build_datasets
        if c.objective == "dpo":
            from ember.train.dpo import build_pair_datasets as datasets
        if self.d.is_main:
            datasets(c.data, self.tokenizer, cache)  # rank 0 tokenizes; the others read its cache
        dist.barrier()
        self.train_data, self.eval_data = datasets(c.data, self.tokenizer, cache)
        self.sampler = StepSampler(len(self.train_data), self.global_batch, c.seed)
        from ember.train.sharded_init import materialize, meta_model, starts_sharded

        sharded_start = starts_sharded(c)  # ZeRO-2/3: no rank ever holds the whole model
        meta_model(self.model_config)  # (the libraries building a model loads are counted before the model)
        reset_peak_memory(self.d.device)
        before_model = current_memory_bytes(self.d.device)
        self.before_model_file_bytes = file_backed_bytes(self.d.device)
        base = meta_model(self.model_config) if sharded_start else build_model(c, self.model_config)
        from ember.models.moe import MoE

        self.moe_layers = [m for m in base.modules() if isinstance(m, MoE)]
        self.aux_coef = float(self.model_config.raw.get("router_aux_loss_coef", 0.01))
        self.last_aux_loss = 0.0
        base.set_gradient_checkpointing(c.activation_checkpointing)
        self.reference_model = None  # DPO's frozen starting model, for `reference: live` (not LoRA: its base)
        if c.objective == "dpo" and c.dpo.reference == "live" and c.lora is None:
            import copy

            # (copied before context parallel: the copy scores whole sequences on every rank)
            frozen = build_model(c, self.model_config) if sharded_start else copy.deepcopy(base)
            self.reference_model = frozen.to(self.d.device).eval().requires_grad_(False)
        if self.cp is not None:
            self.cp.apply(base)
        if c.compile:  # after activation checkpointing (and DPO's copy), before DDP/FSDP2 wrap the blocks
            from ember.train.compile import compile_blocks

            compile_blocks(base, self.d.is_main)
        self.model, self.optimizer = shard_model(base, c, self.d,
                                                 lambda model: materialize(model, c, self.d.device))
        # What building and sharding the model took at its peak, over what the process held before.
        self.startup_bytes = peak_memory_bytes(self.d.device) - before_model
        self.before_model_bytes = before_model
        from ember.train.expert_parallel import expert_params

        self.expert_params = expert_params(base)
        sharded = {id(p) for p in self.expert_params}
        self.dense_params = [p for p in self.model.parameters() if id(p) not in sharded]
        self.scheduler = build_scheduler(self.optimizer, c)
        self.scaler = LossScaler(c.loss_scaling if c.precision == "fp16" else None)
        if c.objective == "dpo" and c.dpo.reference == "precomputed":  # before a checkpoint replaces the weights
            self._precompute_reference(cache)
        self.start_step = 0
        restarts = restart_count()  # torchrun restarted the group after a rank died: continue where it was
        explicit = c.resume if c.resume != "auto" else None
        resume = (latest_checkpoint(self.run_dir) if c.resume == "auto" or restarts else None) or explicit
        if restarts:
            logger.info("restart %d: resuming from %s", restarts, resume or "step 0 (no complete checkpoint yet)")
        elif c.resume == "auto":
            logger.info("resume: auto: %s", f"continuing from {resume}" if resume else "no complete checkpoint yet; "
                        "starting at step 0")
        if resume:
            self.start_step = load_checkpoint(Path(resume), self.model, self.optimizer, self.scheduler,
                                              c.zero_stage)
            self.scaler.load(Path(resume))

    def _forward(self, inputs: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None = None,
                 reduction: str = "none") -> torch.Tensor:
        """The labels' log-probabilities [B, T] (0 where a label is -100), or with reduction="sum" their sum
        (gradients without recomputing the LM head: ember.models.loss), the LM head chunk by chunk;
        `document_ids` [B, T]: the windows' documents (`data.packing: documents`) attend only within themselves."""
        device = self.d.device
        extra = {} if document_ids is None else {"document_ids": document_ids.to(device)}
        if self.cp is not None:  # this rank's slice of the sequences: [B, T / context_parallel]
            document_ids = None if document_ids is None else document_ids.to(device)  # (the mask: on the device)
            inputs, labels, positions = self.cp.shard(inputs.to(device), labels.to(device), document_ids)
            extra = {"positions": positions.to(device)}
        with autocast(self.config, self.d):
            return self.model(inputs.to(device), labels=labels.to(device), reduction=reduction, **extra)

    def _sequence_logps(self, inputs: torch.Tensor, labels: torch.Tensor, average: bool) -> torch.Tensor:
        """[B] each row's summed (or averaged) label log-probabilities. Context parallel: each rank sums its
        slice and the group adds the sums up (differentiably: the DPO loss, the same on every rank of the
        group, sends each rank the gradient of its own tokens, times the group size, which is what the
        SFT loss's scaling gives, see ember.train.context_parallel)."""
        from ember.train.dpo import sequence_logps

        labels = labels.to(self.d.device)
        if self.cp is None:
            return sequence_logps(self._forward(inputs, labels), labels, average)
        total = dist_nn.all_reduce(self._forward(inputs, labels).sum(-1), group=self.cp.group)
        return total / (labels != -100).sum(-1).clamp(min=1) if average else total

    def _precompute_reference(self, cache: Path) -> None:
        """DPO's reference: every pair's log-probabilities under the starting model, once (cached by content)."""
        from ember.train.dpo import precompute_reference, reference_cache_key

        c, d = self.config, self.d
        average = c.dpo.loss_type == "ipo"
        for data in (self.train_data, self.eval_data):
            if data is None:
                continue
            path = cache / f"dpo-reference-{reference_cache_key(c, data)}.pt"
            cached = torch.tensor(int(path.is_file()))
            dist.all_reduce(cached, op=dist.ReduceOp.MIN)  # all ranks compute, or none (the forwards are collective)
            if cached:
                data.reference = torch.load(path)
                continue
            logger.info("dpo: reference log-probabilities of %d pairs (once; cached in %s)", len(data), cache)
            data.reference = precompute_reference(self.model, data, c.micro_batch_size, self.data_rank,
                                                  self.data_world, d.device,
                                                  lambda i, y: self._sequence_logps(i, y, average),
                                                  keep=self.cp is None or self.cp.rank == 0)
            if d.is_main:
                torch.save(data.reference, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)

    def _reference_logps(self, data, inputs: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """[2B] reference log-probabilities of a DPO batch's rows (chosen, then rejected)."""
        from ember.train.dpo import adapters_off, sequence_logps

        if data.reference is not None:
            ref = data.reference[pairs]
            return torch.cat([ref[:, 0], ref[:, 1]]).to(self.d.device)
        average = self.config.dpo.loss_type == "ipo"
        with torch.no_grad():
            labels = labels.to(self.d.device)
            if self.reference_model is not None:
                with autocast(self.config, self.d):
                    logps = self.reference_model(inputs.to(self.d.device), labels=labels)
                return sequence_logps(logps, labels, average)
            with adapters_off(self.model):
                return self._sequence_logps(inputs, labels, average)

    def _loss(self, batch: tuple, data=None) -> torch.Tensor:
        """The micro-batch's loss: next-token cross-entropy (SFT) or the DPO loss of its pairs."""
        if self.config.objective == "dpo":
            return self._dpo_loss(*batch, data=data or self.train_data)
        inputs, labels, *document_ids = batch  # (document ids with `data.packing: documents`)
        # the mean over the trained labels (a chat's prompt tokens are -100); 0 if a window has none
        # (context parallel: this rank's tokens' share of the whole micro-batch's mean, times the group size,
        # as DDP averages over every rank: ember.train.context_parallel)
        loss = -self._forward(inputs, labels, *document_ids, reduction="sum") * self.config.context_parallel \
            / (labels != -100).sum().clamp(min=1).to(self.d.device)
        if self.model.training and self.moe_layers:  # the routers' load-balancing loss
            aux = sum(m.aux_loss for m in self.moe_layers)
            self.last_aux_loss = float(aux.detach())
            loss = loss + self.aux_coef * aux
        return loss

    def _dpo_loss(self, inputs: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor, data) -> torch.Tensor:
        """The mean DPO loss of the micro-batch's pairs; their rewards are summed into `pair_stats`."""
        from ember.train.dpo import dpo_loss

        spec = self.config.dpo
        policy = self._sequence_logps(inputs, labels, spec.loss_type == "ipo")
        reference = self._reference_logps(data, inputs, labels, pairs)
        b = len(pairs)
        losses, rewards = dpo_loss(policy[:b], policy[b:], reference[:b], reference[b:], spec)
        chosen, rejected = rewards["chosen_reward"], rewards["rejected_reward"]
        self.pair_stats += torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
                                        torch.tensor(float(b), device=chosen.device)]).to(self.pair_stats)
        return losses.mean()

    def _reset_pair_stats(self) -> None:
        self.pair_stats = torch.zeros(4, dtype=torch.float64, device=self.d.device)

    def _pair_record(self, prefix: str = "") -> dict[str, float]:
        """Means over every rank's pairs since the last reset: DPO's rewards, margin and accuracy."""
        if self.config.objective != "dpo":
            return {}
        if dist.is_initialized():
            dist.all_reduce(self.pair_stats)
        chosen, rejected, wins = (self.pair_stats[:3] / self.pair_stats[3].clamp(min=1)).tolist()
        return {f"{prefix}reward_accuracy": wins, f"{prefix}reward_margin": chosen - rejected,
                f"{prefix}chosen_reward": chosen, f"{prefix}rejected_reward": rejected}

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (mean loss, grad norm)."""
        c, d = self.config, self.d
        total = torch.zeros((), device=d.device)
        trained = torch.zeros((), device=d.device)  # labels the loss counted (chat prompts are not)
        self._reset_pair_stats()
        for micro in range(self.accum):
            indices = self.sampler.micro_batch(step, self.data_rank, self.data_world, micro, c.micro_batch_size,
                                               self.accum)
            batch = self.train_data.batch(indices)
            trained += (batch[1] != -100).sum()
            with no_grad_sync(self.model, c, last_micro=micro == self.accum - 1):
                loss = self._loss(batch) / self.accum
                self.scaler.scale_loss(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.model.parameters())
        norm = self._clip()
        if self.scaler.update(math.isfinite(norm)):  # fp16: an overflowed step is skipped, and its lr step
            self.optimizer.step()
            self.scheduler.step()
        self.last_state_bytes = model_state_bytes(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        dist.all_reduce(trained)
        self.last_trained_tokens = int(trained.item()) // c.context_parallel  # (a group's ranks count one batch)
        self.last_pairs = self._pair_record()
        return total.item() / d.world, norm

    def _clip(self) -> float:
        max_norm = self.config.grad_clip if self.config.grad_clip else float("inf")
        if self.expert_params:
            from ember.train.expert_parallel import clip_grad_norm, scale_expert_grads

            scale_expert_grads(self.expert_params, self.d.world)
            return clip_grad_norm(self.dense_params, self.expert_params, max_norm)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    @torch.no_grad()
    def evaluate(self, max_sequences: int = 256) -> float | None:
        """Mean loss over (up to max_sequences) held-out sequences, all ranks together: per label token
        (SFT) or per pair (DPO), so neither the micro-batch size nor the world size changes it."""
        if self.eval_data is None:
            return None
        self.model.eval()
        c, d = self.config, self.d
        n = min(len(self.eval_data), max_sequences)
        total = torch.zeros(2, dtype=torch.float64, device=d.device)
        self._reset_pair_stats()
        rank, world = self.data_rank, self.data_world  # (a context-parallel group scores the same sequences)
        for start in range(0, n, c.micro_batch_size * world):
            # Every rank runs the same number of forwards (FSDP all-gathers are collective); a rank past
            # the end scores one sequence with weight 0, so nothing counts twice.
            idx = list(range(start + rank * c.micro_batch_size, min(n, start + (rank + 1) * c.micro_batch_size)))
            stats = self.pair_stats.clone()
            batch = self.eval_data.batch(idx or [0])
            loss = self._loss(batch, self.eval_data).double()
            # the loss is a mean over the batch's labels (SFT) or pairs (DPO): weigh it by their count
            weight = float(len(idx)) if c.objective == "dpo" else float((batch[1] != -100).sum()) * bool(idx)
            if not idx:
                self.pair_stats = stats
            total += torch.stack([loss * weight, torch.tensor(weight, dtype=torch.float64, device=d.device)])
        dist.all_reduce(total)
        self.last_eval_pairs = self._pair_record("eval_")
        self.model.train()
        return (total[0] / total[1]).item()

    @torch.no_grad()
    def logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """log p(token_t | tokens before t) for t >= 1 of each sequence, with the training
        forward, one sequence at a time (so no padding or batch shape changes a number)."""
        if self.cp is not None:
            raise NotImplementedError("logprobs: not under context_parallel (each rank would need its slice)")
        was_training = self.model.training
        self.model.eval()
        out = []
        for ids in token_ids:
            x = torch.tensor([ids], device=self.d.device)
            with autocast(self.config, self.d):
                logits = self.model(x)[0].float()
            out.append(logits[:-1].log_softmax(-1).gather(1, x[0, 1:, None]).squeeze(1).tolist())
        self.model.train(was_training)
        return out

    def state_dict_for_engine(self) -> dict[str, torch.Tensor]:
        """The full model state (gathered from shards) on rank 0; an empty dict elsewhere."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.d.is_main else {}

    def save(self, step: int, name: str | None = None) -> Path:
        """A checkpoint, committed atomically: every rank writes into a directory aside, which is renamed
        into place (and `checkpoints/latest` pointed at it) only once all have finished, so a crash or a
        full disk mid-save never leaves a partial checkpoint where `resume: auto` would pick it up."""
        root = self.run_dir / "checkpoints"
        name = name or f"step-{step}"
        path, pending = root / name, root / f".pending-{name}"
        if self.d.is_main:
            shutil.rmtree(pending, ignore_errors=True)
            pending.mkdir(parents=True)
        dist.barrier()
        tokenizer_dir = self.config.model.tokenizer_dir
        try:
            save_checkpoint(pending, step, self.model, self.optimizer, self.scheduler, self.config.zero_stage,
                            self.model_config, tokenizer_dir, self.config.to_dict(), self.d.is_main)
            if self.d.is_main:
                self.scaler.save(pending)
            if self.config.lora is not None:
                self._save_adapter(pending / "adapter")
        except Exception as e:
            full = disk_full(e, root)  # (before the pending files are deleted and the space comes back)
            shutil.rmtree(pending, ignore_errors=True)  # no partial checkpoint left; `latest` is untouched
            if full:
                raise OSError(errno.ENOSPC, f"No space left on device: saving checkpoint {name} in {root}") from e
            raise
        dist.barrier()
        if self.d.is_main:
            replaced = root / f".replaced-{name}"
            if path.exists():  # saved again under this name: `latest` must never name a missing directory
                shutil.rmtree(replaced, ignore_errors=True)
                path.rename(replaced)
            pending.rename(path)
            shutil.rmtree(replaced, ignore_errors=True)
            marker = root / ".latest.tmp"
            marker.write_text(name)
            marker.replace(root / "latest")
            logger.info("saved checkpoint %s (step %d)", path, step)
            if self.config.keep_last:
                prune_checkpoints(root, self.config.keep_last)
        dist.barrier()
        return path

    def _save_adapter(self, out_dir: Path) -> None:
        """The adapter in PEFT's format beside the checkpoint: `ember serve --lora-modules name=DIR`
        (or HF PEFT, or vLLM) loads it as it is."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        from ember.models.lora import adapter_tensors, save_adapter, trainable_adapters

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                         ignore_frozen_params=True))
        if self.d.is_main:
            spec = self.config.lora
            targets = sorted({name for a in trainable_adapters(self.model).values() for name in a.names.values()})
            save_adapter(adapter_tensors(self.model, full), out_dir, spec.r, spec.alpha, spec.dropout, targets,
                         self.config.model.path, spec.use_rslora)
        dist.barrier()

    # ---- the loop ---------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        started = time.perf_counter()
        self._setup()
        c, d = self.config, self.d
        metrics_file = self.run_dir / "metrics.jsonl"
        if d.is_main:
            _drop_records_after(metrics_file, self.start_step)  # a resumed run logs those steps again
        tokens_per_step = self.global_batch * c.data.seq_len
        bar = tqdm(total=c.max_steps, initial=self.start_step, desc="train", unit="step", disable=not d.is_main)
        report = RunReport(self.run_dir, c, d.is_main, started)  # TensorBoard scalars, summary.json
        last: dict[str, Any] = {}
        try:
            for step in range(self.start_step, c.max_steps):
                t0, cpu0 = time.perf_counter(), time.process_time()
                lr = self.scheduler.get_last_lr()[0]
                loss, norm = self.train_step(step)
                seconds = time.perf_counter() - t0
                if c.compile and step == self.start_step and d.is_main:
                    logger.info("compile: the first step took %.1f s, tracing and compiling included", seconds)
                record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm,
                          "trained_tokens": self.last_trained_tokens, **self.last_pairs,
                          **({"aux_loss": self.last_aux_loss} if self.moe_layers else {}), **self.scaler.metrics(),
                          "tokens_per_s": tokens_per_step / seconds, "step_s": seconds,
                          "cpu_s": time.process_time() - cpu0}  # rank 0's CPU time (a shared machine's steadier clock)
                done = step + 1 == c.max_steps
                if (c.eval_interval and (step + 1) % c.eval_interval == 0) or done:
                    record["eval_loss"] = self.evaluate()
                    record.update(getattr(self, "last_eval_pairs", {}))
                if step == self.start_step or done:
                    record.update(self._memory_record())
                if d.is_main and ((step + 1) % c.log_interval == 0 or done or "eval_loss" in record):
                    with metrics_file.open("a") as f:  # before the checkpoint: a resume never lacks its record
                        f.write(json.dumps(record) + "\n")
                if c.save_interval and (step + 1) % c.save_interval == 0 and not done:
                    self.save(step + 1)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{record['lr']:.2e}")
                last = record
                report.step(record, tokens_per_step)
            last["checkpoint"] = str(self.save(c.max_steps, "final"))
            self.summary = report.finish(last, self.model_config.num_params, d.device, d.world)
        finally:
            bar.close()
            report.close()
        return last

    def _training_peak_bytes(self) -> int:
        """The peak since the model was built over what the process held before it, less the file pages
        mapped meanwhile (on a CPU: the anonymous memory's peak, which `estimate` predicts; those pages
        stay mapped once touched, so the ones mapped by the end were there at the peak, or nearly)."""
        files = file_backed_bytes(self.d.device) - self.before_model_file_bytes
        return peak_memory_bytes(self.d.device) - self.before_model_bytes - max(0, files)

    def _memory_record(self) -> dict[str, Any]:
        """Each rank's model-state bytes and peak memory, gathered on every rank."""
        mine = {"model_state_bytes": self.last_state_bytes["total"], "peak_bytes": peak_memory_bytes(self.d.device),
                "current_bytes": current_memory_bytes(self.d.device), "startup_bytes": self.startup_bytes,
                "training_peak_bytes": self._training_peak_bytes()}
        everyone: list[Any] = [None] * self.d.world
        dist.all_gather_object(everyone, mine)
        return {"rank_model_state_bytes": [e["model_state_bytes"] for e in everyone],
                "rank_peak_bytes": [e["peak_bytes"] for e in everyone],
                "rank_current_bytes": [e["current_bytes"] for e in everyone],
                "rank_model_startup_bytes": [e["startup_bytes"] for e in everyone],
                # the peak since the model was built, over what the process held before it, library pages
                # left out (`estimate`'s peak)
                "rank_model_peak_bytes": [e["training_peak_bytes"] for e in everyone]}


def run(config: TrainConfig) -> dict[str, Any]:
    """Entry point for one rank (or the only process)."""
    try:
        return Trainer(config).fit()
    except BaseException as e:
        record_error(e)  # now: tearing the group down makes the peers fail, and the first failure is the cause
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

