"""TrainConfig: one YAML/JSON file, validated before any process starts.

Unknown keys are rejected with the nearest valid name. A DeepSpeed-style config
(train_micro_batch_size_per_gpu, zero_optimization, bf16, optimizer, scheduler, ...)
is translated to the same fields, so users can bring theirs.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

HF_MODEL_FIELDS = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "hidden_act", "sliding_window", "model_type",
    "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size", "norm_topk_prob", "router_aux_loss_coef", "decoder_sparse_step",
}


class ConfigError(ValueError):
    pass


def _check_keys(section: str, given: dict[str, Any], allowed: set[str]) -> None:
    for key in given:
        if key not in allowed:
            near = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f" (valid: {', '.join(sorted(allowed))})"
            raise ConfigError(f"{section}{'.' if section else ''}{key}: unknown key{hint}")


@dataclass(frozen=True)
class ModelSpec:
    path: str | None = None  # an HF directory to fine-tune
    architecture: str = "LlamaForCausalLM"  # from scratch: this class with `config` fields
    tokenizer: str | None = None  # a directory with tokenizer.json (default: path)
    config: dict[str, Any] = field(default_factory=dict)
    init_std: float = 0.02

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        top = {"path", "architecture", "tokenizer", "init_std"}
        _check_keys("model", d, top | HF_MODEL_FIELDS)
        return cls(**{k: v for k, v in d.items() if k in top},
                   config={k: v for k, v in d.items() if k in HF_MODEL_FIELDS})

    @property
    def tokenizer_dir(self) -> str | None:
        return self.tokenizer or self.path


@dataclass(frozen=True)
class DataSpec:
    train: tuple[str, ...] = ()  # text or JSONL files (globs allowed)
    eval: tuple[str, ...] = ()  # held-out files; default: the last eval_fraction of train
    text_field: str = "text"  # the JSONL field holding the text
    seq_len: int = 256
    eval_fraction: float = 0.05
    # Which tokens of chat (`messages`) and prompt/completion records are labels: the assistant turns
    # (completions), the last assistant turn only, or every token.
    loss_on: str = "assistant"

    def __post_init__(self):
        if self.loss_on not in ("assistant", "last_turn", "all"):
            raise ConfigError(f"data.loss_on: {self.loss_on!r} is not one of assistant, last_turn, all")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataSpec":
        _check_keys("data", d, {f.name for f in fields(cls)})
        d = dict(d)
        for key in ("train", "eval"):
            if isinstance(d.get(key), str):
                d[key] = [d[key]]
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class OptimSpec:
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at max_steps

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OptimSpec":
        _check_keys("optimizer", d, {f.name for f in fields(cls)})
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass(frozen=True)
class LoRASpec:
    """Fine-tune low-rank adapters instead of the model (PEFT's LoraConfig names accepted: lora_alpha,
    lora_dropout). The base is frozen; with `base_quantization` it is held int8/int4 (QLoRA)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"  # HF module names (q_proj, ...) or "all-linear"
    use_rslora: bool = False
    base_quantization: str | None = None  # None | int8 | int4

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRASpec":
        d = dict(d)
        for peft_name, name in (("lora_alpha", "alpha"), ("lora_dropout", "dropout")):
            if peft_name in d:
                d[name] = d.pop(peft_name)
        for ignored in ("peft_type", "task_type", "bias", "inference_mode"):
            d.pop(ignored, None)
        if d.get("modules_to_save"):
            raise ConfigError(f"lora.modules_to_save: {d['modules_to_save']!r} is not supported yet (adapters on the "
                              "decoder layers' projections only)")
        d.pop("modules_to_save", None)
        _check_keys("lora", d, {f.name for f in fields(cls)})
        if isinstance(d.get("target_modules"), list):
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)

    def __post_init__(self):
        checks = [
            ("lora.r", isinstance(self.r, int) and self.r >= 1, "an integer >= 1"),
            ("lora.alpha", self.alpha > 0, "> 0"),
            ("lora.dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("lora.target_modules", self.target_modules == "all-linear" or (
                isinstance(self.target_modules, tuple) and self.target_modules), "a list of module names or 'all-linear'"),
            ("lora.base_quantization", self.base_quantization in (None, "int8", "int4"), "none, int8 or int4"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"{name}: {getattr(self, name.split('.')[1])!r} is invalid ({why})")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSpec
    data: DataSpec
    run_dir: str = "runs/ember"
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 (fp32 master weights and gradient reduction)
    micro_batch_size: int = 8  # sequences per rank per forward
    grad_accum: int | None = None  # default 1, or derived from global_batch_size
    global_batch_size: int | None = None  # sequences per optimizer step, all ranks together
    max_steps: int = 100
    grad_clip: float | None = 1.0
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    seed: int = 0
    log_interval: int = 1
    eval_interval: int = 0  # 0: only at the end
    save_interval: int = 0  # 0: only at the end
    resume: str | None = None  # a checkpoint directory to continue from, or "auto": the run's latest complete one
    expert_parallel: bool = False  # MoE: experts sharded over the processes, tokens moved by all-to-all
    device: str = "auto"  # auto (CUDA when each process on a node gets a GPU, else CPU) | cpu | cuda
    optimizer: OptimSpec = field(default_factory=OptimSpec)
    lora: LoRASpec | None = None  # fine-tune adapters (a `lora:` section), not the whole model

    def __post_init__(self):
        checks = [
            ("zero_stage", self.zero_stage in (0, 1, 2, 3), "one of 0, 1, 2, 3"),
            ("precision", self.precision in ("fp32", "bf16"), "fp32 or bf16"),
            ("device", self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
            ("micro_batch_size", self.micro_batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum is None or self.grad_accum >= 1, ">= 1"),
            ("max_steps", self.max_steps >= 1, ">= 1"),
            ("data.seq_len", self.data.seq_len >= 2, ">= 2"),
            ("data.eval_fraction", 0 <= self.data.eval_fraction < 1, "in [0, 1)"),
            ("optimizer.lr", self.optimizer.lr > 0, "> 0"),
            ("offload_params", not self.offload_params or self.zero_stage == 3, "needs zero_stage 3"),
            ("offload_optimizer", not self.offload_optimizer or self.zero_stage >= 2, "needs zero_stage 2 or 3"),
            ("expert_parallel", not self.expert_parallel or self.zero_stage != 1,
             "works with zero_stage 0, 2 or 3: ZeRO-1's optimizer assumes replicated parameters"),
            ("lora", self.lora is None or self.model.path is not None, "adapters fine-tune a model: give model.path"),
            ("lora", self.lora is None or self.lora.base_quantization is None or self.zero_stage < 2,
             "a quantized base (QLoRA) trains with zero_stage 0 or 1 (FSDP shards float tensors)"),
        ]
        for name, ok, why in checks:
            if not ok:
                value = getattr(self, name, None) if "." not in name else "(see config)"
                raise ConfigError(f"{name}: {value!r} is invalid ({why})")
        if not self.data.train:
            raise ConfigError("data.train: at least one training file is required")
        if self.model.path is None and self.model.tokenizer is None:
            raise ConfigError("model: give 'path' (an HF model to fine-tune) or 'tokenizer' (to train from scratch)")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        if self.global_batch_size is None:
            return self.grad_accum or 1
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size: {self.global_batch_size} is not a multiple of micro_batch_size x world size "
                f"({self.micro_batch_size} x {world_size})"
            )
        accum = self.global_batch_size // per_step
        if self.grad_accum is not None and self.grad_accum != accum:
            raise ConfigError(f"grad_accum: {self.grad_accum} contradicts global_batch_size (which implies {accum})")
        return accum

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch_size * world_size * self.accumulation(world_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = _from_deepspeed(dict(d))
        allowed = {f.name for f in fields(cls)}
        _check_keys("", d, allowed)
        if "model" not in d or "data" not in d:
            raise ConfigError("config: 'model' and 'data' sections are required")
        d["model"] = ModelSpec.from_dict(d["model"])
        d["data"] = DataSpec.from_dict(d["data"])
        if "optimizer" in d:
            d["optimizer"] = OptimSpec.from_dict(d["optimizer"])
        if d.get("lora") is not None:
            d["lora"] = LoRASpec.from_dict(d["lora"])
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: {str(path)!r} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text) or {}
            else:
                raw = json.loads(text)
        except Exception as e:
            raise ConfigError(f"{path}: cannot be parsed ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        config = cls.from_dict(raw)
        # Relative data/model paths are relative to the config file.
        base = path.parent
        resolve = lambda p: p if p is None or Path(p).is_absolute() else str(base / p)  # noqa: E731
        config = replace(
            config,
            model=replace(config.model, path=resolve(config.model.path), tokenizer=resolve(config.model.tokenizer)),
            data=replace(config.data, train=tuple(resolve(p) for p in config.data.train),
                         eval=tuple(resolve(p) for p in config.data.eval)),
            run_dir=resolve(config.run_dir), resume=config.resume if config.resume == "auto" else resolve(config.resume),
        )
        return replace(config, **overrides) if overrides else config

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


_DS_SCHEDULERS = {"WarmupCosineLR", "WarmupDecayLR", "WarmupLR"}


def _from_deepspeed(d: dict[str, Any]) -> dict[str, Any]:
    """Translate DeepSpeed's common keys into ember's; leave everything else for validation."""
    moves = {
        "train_micro_batch_size_per_gpu": "micro_batch_size",
        "gradient_accumulation_steps": "grad_accum",
        "gradient_clipping": "grad_clip",
        "train_batch_size": "global_batch_size",
    }
    for ds_key, key in moves.items():
        if ds_key in d:
            d[key] = d.pop(ds_key)
    if "zero_optimization" in d:
        zero = d.pop("zero_optimization")
        _check_keys("zero_optimization", zero, {"stage", "offload_optimizer", "offload_param", "contiguous_gradients",
                                                "overlap_comm", "reduce_scatter", "allgather_partitions",
                                                "reduce_bucket_size", "allgather_bucket_size",
                                                "stage3_param_persistence_threshold"})
        d["zero_stage"] = zero.get("stage", 0)
        if (zero.get("offload_optimizer") or {}).get("device", "none") == "cpu":
            d["offload_optimizer"] = True
        if (zero.get("offload_param") or {}).get("device", "none") == "cpu":
            d["offload_params"] = True
    for key in ("bf16", "fp16"):
        if key in d:
            section = d.pop(key)
            if section.get("enabled", False):
                if key == "fp16":
                    raise ConfigError("fp16.enabled: fp16 training is not supported; use bf16")
                d["precision"] = "bf16"
    optimizer = d.get("optimizer")
    if isinstance(optimizer, dict) and "type" in optimizer:
        kind = optimizer.get("type", "")
        if kind.lower() not in ("adamw", "adam"):
            raise ConfigError(f"optimizer.type: {kind!r} is not supported (AdamW)")
        params = dict(optimizer.get("params", {}))
        d["optimizer"] = {k: v for k, v in params.items() if k in ("lr", "weight_decay", "betas", "eps")}
    scheduler = d.pop("scheduler", None)
    if scheduler:
        if scheduler.get("type") not in _DS_SCHEDULERS:
            raise ConfigError(f"scheduler.type: {scheduler.get('type')!r} is not one of {sorted(_DS_SCHEDULERS)}")
        params = scheduler.get("params", {})
        opt = d.setdefault("optimizer", {})
        if "warmup_num_steps" in params:
            opt["warmup_steps"] = params["warmup_num_steps"]
        if "warmup_max_lr" in params:
            opt["lr"] = params["warmup_max_lr"]
        if "total_num_steps" in params:
            d.setdefault("max_steps", params["total_num_steps"])
    for ignored in ("steps_per_print", "wall_clock_breakdown", "prescale_gradients", "zero_allow_untested_optimizer"):
        d.pop(ignored, None)
    return d
