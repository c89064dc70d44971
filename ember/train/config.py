"""TrainConfig: one YAML/JSON file, validated before any process starts.

Unknown keys are rejected, all of them in one error, each with the nearest valid name. A DeepSpeed
config (train_micro_batch_size_per_gpu, zero_optimization, fp16/bf16, optimizer, scheduler, "auto"
values, ...) is taken as written and translated to the same fields: see ember.train.ds_config.
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
    """One ConfigError naming every unknown key of a section (a near name when there is one)."""
    lines, far = [], False
    for key in given:
        if key not in allowed:
            near = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
            far = far or not near
            lines.append(f"{section}{'.' if section else ''}{key}: unknown key" + (f"; did you mean {near[0]!r}?"
                                                                                   if near else ""))
    if far:
        lines.append(f"  (valid {section or 'top-level'} keys: {', '.join(sorted(allowed))})")
    if lines:
        raise ConfigError("\n".join(lines))


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
    # text or JSONL files (globs allowed); with Hugging Face datasets installed also parquet/arrow files,
    # save_to_disk directories and Hub ids hf:[ORG/]NAME[:CONFIG][@SPLIT] (ember.train.hf_datasets)
    train: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()  # held-out files; default: the last eval_fraction of train
    text_field: str = "text"  # the JSONL (or dataset) field holding the text
    seq_len: int = 256
    eval_fraction: float = 0.05
    # Which tokens of chat (`messages`) and prompt/completion records are labels: the assistant turns
    # (completions), the last assistant turn only, or every token.
    loss_on: str = "assistant"
    # stream: a window attends across the documents packed into it (pretraining's usual packing);
    # documents: each document sees only itself (block-causal attention, positions restarting at 0),
    # as if trained alone (TRL's padding-free packing); the first token of a document is not a label.
    packing: str = "stream"

    def __post_init__(self):
        if self.loss_on not in ("assistant", "last_turn", "all"):
            raise ConfigError(f"data.loss_on: {self.loss_on!r} is not one of assistant, last_turn, all")
        if self.packing not in ("stream", "documents"):
            raise ConfigError(f"data.packing: {self.packing!r} is not one of stream, documents")

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


OPTIMIZERS = ("adamw", "adam", "sgd", "lion")


@dataclass(frozen=True)
class OptimSpec:
    type: str = "adamw"  # adamw | adam (weight decay as an L2 term, torch.optim.Adam) | sgd | lion
    lr: float = 3e-4
    weight_decay: float = 0.01  # on matrices; norms and biases are not decayed
    betas: tuple[float, float] = (0.9, 0.95)  # adam, adamw, lion
    eps: float = 1e-8  # adam, adamw
    momentum: float = 0.0  # sgd
    nesterov: bool = False  # sgd
    warmup_steps: int = 0  # the default `cosine` schedule's linear warmup
    min_lr_ratio: float = 0.1  # the default `cosine` schedule decays to lr * min_lr_ratio at max_steps

    def __post_init__(self):
        if self.type not in OPTIMIZERS:
            raise ConfigError(f"optimizer.type: {self.type!r} is not supported (one of {', '.join(OPTIMIZERS)})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OptimSpec":
        _check_keys("optimizer", d, {f.name for f in fields(cls)})
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        if isinstance(d.get("type"), str):
            d["type"] = d["type"].lower()
        return cls(**d)


@dataclass(frozen=True)
class SchedulerSpec:
    """The LR schedule (ember.train.schedules): `cosine` (ember's default: the optimizer's warmup_steps,
    then cosine to its min_lr_ratio), `constant`, or DeepSpeed's WarmupLR, WarmupDecayLR, WarmupCosineLR,
    OneCycle, LRRangeTest with DeepSpeed's params (all of them, defaults filled in, after from_dict)."""

    type: str = "cosine"
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], lr: float, max_steps: int) -> "SchedulerSpec":
        from ember.train.schedules import resolve

        _check_keys("scheduler", d, {"type", "params"})
        params, problems = resolve(d.get("type", "cosine"), dict(d.get("params") or {}), lr, max_steps)
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(d.get("type", "cosine"), params)


@dataclass(frozen=True)
class LossScaleSpec:
    """fp16's loss scaling (ember.train.precision), with DeepSpeed's fp16 names and defaults."""

    loss_scale: float = 0  # 0: dynamic; > 0: this static scale
    initial_scale_power: int = 16  # the dynamic scale starts at 2**initial_scale_power
    loss_scale_window: int = 1000  # clean steps before the scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale halves
    consecutive_hysteresis: bool = False  # a clean step restores the hysteresis
    min_loss_scale: float = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LossScaleSpec":
        _check_keys("loss_scaling", d, {f.name for f in fields(cls)})
        return cls(**d)

    def __post_init__(self):
        checks = [("loss_scale", self.loss_scale >= 0, ">= 0"), ("hysteresis", self.hysteresis >= 1, ">= 1"),
                  ("loss_scale_window", self.loss_scale_window >= 1, ">= 1"),
                  ("min_loss_scale", self.min_loss_scale > 0, "> 0")]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"loss_scaling.{name}: {getattr(self, name)!r} is invalid ({why})")


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
class DPOSpec:
    """Preference optimization (`objective: dpo`); see ember.train.dpo."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo
    label_smoothing: float = 0.0  # conservative DPO (cDPO): the labels are flipped with this probability
    reference: str = "precomputed"  # precomputed | live

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DPOSpec":
        _check_keys("dpo", d, {f.name for f in fields(cls)})
        return cls(**d)

    def __post_init__(self):
        checks = [
            ("beta", self.beta > 0, "> 0"),
            ("loss_type", self.loss_type in ("sigmoid", "ipo"), "sigmoid or ipo"),
            ("label_smoothing", 0 <= self.label_smoothing < 0.5, "in [0, 0.5)"),
            ("reference", self.reference in ("precomputed", "live"), "precomputed or live"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"dpo.{name}: {getattr(self, name)!r} is invalid ({why})")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSpec
    data: DataSpec
    run_dir: str = "runs/ember"
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp32 master weights and gradient reduction; fp16 scales the loss)
    micro_batch_size: int | None = 8  # sequences per rank per forward; None: global_batch_size / (accum x world)
    grad_accum: int | None = None  # default 1, or derived from global_batch_size
    global_batch_size: int | None = None  # sequences per optimizer step, all ranks together
    max_steps: int = 100
    grad_clip: float | None = 1.0
    activation_checkpointing: bool = False
    compile: bool = False  # each transformer block under torch.compile (ember.train.compile)
    offload_optimizer: bool = False
    offload_params: bool = False
    seed: int = 0
    log_interval: int = 1
    eval_interval: int = 0  # 0: only at the end
    save_interval: int = 0  # 0: only at the end
    keep_last: int | None = None  # keep the N newest step-* checkpoints (and `latest`, `final`); None: all
    tensorboard: bool = False  # also write scalars to RUN_DIR/tensorboard (needs the tensorboard package)
    resume: str | None = None  # a checkpoint directory to continue from, or "auto": the run's latest complete one
    expert_parallel: bool = False  # MoE: experts sharded over the processes, tokens moved by all-to-all
    context_parallel: int = 1  # ranks that split each sequence (Ulysses; ember.train.context_parallel)
    device: str = "auto"  # auto (CUDA when each process on a node gets a GPU, else CPU) | cpu | cuda
    optimizer: OptimSpec = field(default_factory=OptimSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    loss_scaling: LossScaleSpec = field(default_factory=LossScaleSpec)  # precision: fp16
    lora: LoRASpec | None = None  # fine-tune adapters (a `lora:` section), not the whole model
    objective: str = "sft"  # sft: next-token loss | dpo: preference pairs (a `dpo:` section tunes it)
    dpo: DPOSpec | None = None

    def __post_init__(self):
        checks = [
            ("zero_stage", self.zero_stage in (0, 1, 2, 3), "one of 0, 1, 2, 3"),
            ("precision", self.precision in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16"),
            ("device", self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
            ("micro_batch_size", self.micro_batch_size is None or self.micro_batch_size >= 1, ">= 1"),
            ("micro_batch_size", self.micro_batch_size is not None or self.global_batch_size is not None,
             "is derived from global_batch_size (DeepSpeed's train_batch_size): give one"),
            ("grad_accum", self.grad_accum is None or self.grad_accum >= 1, ">= 1"),
            ("max_steps", self.max_steps >= 1, ">= 1"),
            ("context_parallel", self.context_parallel >= 1, ">= 1"),
            ("compile", isinstance(self.compile, bool), "true or false"),
            ("keep_last", self.keep_last is None or self.keep_last >= 1, ">= 1, or null to keep every checkpoint"),
            ("data.seq_len", self.data.seq_len >= 2, ">= 2"),
            ("data.eval_fraction", 0 <= self.data.eval_fraction < 1, "in [0, 1)"),
            ("optimizer.lr", self.optimizer.lr > 0, "> 0"),
            ("offload_params", not self.offload_params or self.zero_stage == 3, "needs zero_stage 3"),
            ("offload_optimizer", not self.offload_optimizer or self.zero_stage >= 2, "needs zero_stage 2 or 3"),
            ("expert_parallel", not self.expert_parallel or self.zero_stage != 1,
             "works with zero_stage 0, 2 or 3: ZeRO-1's optimizer assumes replicated parameters"),
            ("lora", self.lora is None or self.model.path is not None, "adapters fine-tune a model: give model.path"),
            ("objective", self.objective in ("sft", "dpo"), "sft or dpo"),
            ("dpo", self.dpo is None or self.objective == "dpo", "a `dpo:` section needs objective: dpo"),
            ("data.packing", self.data.packing == "stream" or self.objective == "sft",
             "documents packs SFT windows; DPO pads each sequence to its own row already"),
            ("lora", self.lora is None or self.lora.base_quantization is None or self.zero_stage < 2,
             "a quantized base (QLoRA) trains with zero_stage 0 or 1 (FSDP shards float tensors)"),
        ]
        for name, ok, why in checks:
            if not ok:
                value = getattr(self, name, None) if "." not in name else "(see config)"
                raise ConfigError(f"{name}: {value!r} is invalid ({why})")
        if self.objective == "dpo" and self.dpo is None:
            object.__setattr__(self, "dpo", DPOSpec())  # (frozen) the defaults, as an empty `dpo:` section
        if not self.data.train:
            raise ConfigError("data.train: at least one training file is required")
        if self.model.path is None and self.model.tokenizer is None:
            raise ConfigError("model: give 'path' (an HF model to fine-tune) or 'tokenizer' (to train from scratch)")

    def micro_batch(self, world_size: int) -> int:
        """Sequences per rank per forward: micro_batch_size, or derived as DeepSpeed derives it
        (train_batch_size = micro-batch x accumulation x world size)."""
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        accum = self.grad_accum or 1
        if self.global_batch_size % (accum * world_size):
            raise ConfigError(
                f"global_batch_size: {self.global_batch_size} does not divide into grad_accum x world size "
                f"({accum} x {world_size}) micro-batches of whole sequences"
            )
        return self.global_batch_size // (accum * world_size)

    def for_world(self, world_size: int) -> "TrainConfig":
        """This config with the micro-batch and accumulation of a run on `world_size` processes."""
        return replace(self, micro_batch_size=self.micro_batch(world_size), grad_accum=self.accumulation(world_size))

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        micro = self.micro_batch(world_size)
        if self.global_batch_size is None:
            return self.grad_accum or 1
        per_step = micro * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size: {self.global_batch_size} is not a multiple of micro_batch_size x world size "
                f"({micro} x {world_size})"
            )
        accum = self.global_batch_size // per_step
        if self.grad_accum is not None and self.grad_accum != accum:
            raise ConfigError(f"grad_accum: {self.grad_accum} contradicts global_batch_size (which implies {accum})")
        return accum

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch(world_size) * world_size * self.accumulation(world_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Every unknown key and bad section is reported together, in one ConfigError."""
        from ember.train.ds_config import from_deepspeed

        problems: list[str] = []
        d = from_deepspeed(dict(d), problems)
        problems += _autos_left(d)
        _collect(problems, _check_keys, "", d, {f.name for f in fields(cls)})
        if "model" not in d or "data" not in d:
            problems.append("config: 'model' and 'data' sections are required")
        sections = {"model": ModelSpec, "data": DataSpec, "optimizer": OptimSpec, "lora": LoRASpec, "dpo": DPOSpec,
                    "loss_scaling": LossScaleSpec}
        for name, spec in sections.items():
            if d.get(name) is not None:
                d[name] = _collect(problems, spec.from_dict, d[name])
        if "scheduler" in d:
            lr = d["optimizer"].lr if isinstance(d.get("optimizer"), OptimSpec) else OptimSpec.lr
            d["scheduler"] = _collect(problems, SchedulerSpec.from_dict, d["scheduler"] or {}, lr,
                                      d.get("max_steps", cls.max_steps))
        if problems:
            lines = "\n".join(problems)
            count = sum(not line.startswith(" ") for line in lines.splitlines())
            raise ConfigError(lines if count == 1 else f"config: {count} problems:\n{lines}")
        try:
            return cls(**d)
        except TypeError as e:  # a value of the wrong type ("8" for 8, a list for a number, ...)
            raise ConfigError(f"config: {e}") from None

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
        resolve_data = lambda p: p if p.startswith("hf:") else resolve(p)  # noqa: E731  (hf: a Hub dataset id)
        config = replace(
            config,
            model=replace(config.model, path=resolve(config.model.path), tokenizer=resolve(config.model.tokenizer)),
            data=replace(config.data, train=tuple(resolve_data(p) for p in config.data.train),
                         eval=tuple(resolve_data(p) for p in config.data.eval)),
            run_dir=resolve(config.run_dir), resume=config.resume if config.resume == "auto" else resolve(config.resume),
        )
        return replace(config, **overrides) if overrides else config

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _collect(problems: list[str], parse, *args):
    """parse(*args), or None with its ConfigError (or TypeError: a value of the wrong type) noted."""
    try:
        return parse(*args)
    except (ConfigError, TypeError) as e:
        problems.append(str(e))
        return None


def _autos_left(d: dict[str, Any], prefix: str = "") -> list[str]:
    """'auto' where ember has nothing to resolve it from (DeepSpeed's keys are resolved before this)."""
    found = []
    for key, value in d.items():
        if isinstance(value, str) and value == "auto" and f"{prefix}{key}" not in ("resume", "device"):
            found.append(f"{prefix}{key}: 'auto' is only resolved in DeepSpeed's keys; give a value")
        elif isinstance(value, dict) and key != "scheduler":
            found += _autos_left(value, f"{prefix}{key}.")
    return found
