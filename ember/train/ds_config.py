"""DeepSpeed's JSON config taken as written: its keys become ember's, "auto" is resolved, the rest reported.

Hugging Face Trainer's templates (ds_config_zero2.json, ds_config_zero3.json) load unchanged. "auto" takes
what ember would use, as the Trainer fills it from its own arguments: ember's key when the config has
one, else ember's default (micro-batch 8, clipping 1.0, OptimSpec's lr/betas/eps/weight decay; fp16 and
bf16 follow `precision`, fp32 by default; a scheduler's min lr 0, max lr the optimizer's, warmup 0,
total steps max_steps); batch sizes are derived as DeepSpeed derives them (train_batch_size = micro x
accumulation x world). Otherwise DeepSpeed's own defaults apply: an optimizer section's unnamed params
take DeepSpeed's (betas (0.9, 0.999), eps 1e-8, weight decay 0), and no scheduler section means a
constant lr. Documented keys ember has no use for (buckets, overlap, logging, ...) are accepted and
named in one log line; features ember lacks (NVMe offload, ZeRO++ quantization, ...) and unknown keys
are errors, all of them in one ConfigError.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

AUTO = "auto"
COMMS = "FSDP2 buckets and prefetches per layer and overlaps communication itself; gradients reduce in fp32"
SAVING = "ember checkpoints with torch.distributed.checkpoint; `ember train export` writes full weights"
LOGGING = "ember logs metrics.jsonl every log_interval steps"
OFFLOAD = "CPU offload is FSDP2's CPUOffloadPolicy"
OPTIMIZERS = "ember runs torch's optimizers"
ACTIVATIONS = "ember's `activation_checkpointing: true` recomputes each decoder layer"

ZERO_NO_EFFECT = dict.fromkeys((
    "contiguous_gradients", "overlap_comm", "reduce_scatter", "allgather_partitions", "reduce_bucket_size",
    "allgather_bucket_size", "sub_group_size", "round_robin_gradients", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_model_persistence_threshold", "stage3_max_live_parameters",
    "stage3_max_reuse_distance", "use_multi_rank_bucket_allreduce", "ignore_unused_parameters", "legacy_stage1",
    "memory_efficient_linear", "stage3_module_granularity_threshold", "stage3_use_all_reduce_for_fetch_params",
    "stage3_allgather_sequential", "log_trace_cache_warnings", "enable_sanity_checks", "override_module_apply",
    "load_from_fp32_weights", "elastic_checkpoint", "grad_hooks"), COMMS) | dict.fromkeys((
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save"), SAVING) | {
    "aio": OFFLOAD}
TOP_NO_EFFECT = dict.fromkeys((
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "wandb", "csv_monitor",
    "comet", "flops_profiler", "comms_logger"), LOGGING) | dict.fromkeys((
    "prescale_gradients", "gradient_predivide_factor", "communication_data_type", "allgather_size"), COMMS) | {
    "zero_allow_untested_optimizer": OPTIMIZERS, "zero_force_ds_cpu_optimizer": OPTIMIZERS, "checkpoint": SAVING,
    "aio": OFFLOAD}
OFFLOAD_NO_EFFECT = ("pin_memory", "buffer_count", "buffer_size", "max_in_cpu", "fast_init", "pipeline_read",
                     "pipeline_write", "cpuadam_cores_perc", "nvme_path")
# features ember does not implement: accepted only at their 'off' value
ZERO_OFF = {"zero_hpz_partition_size": 1, "zero_quantized_weights": False, "zero_quantized_nontrainable_weights": False,
            "zero_quantized_gradients": False, "mics_shard_size": -1, "mics_hierarchical_params_gather": False,
            "zenflow": None, "zeropp_loco_param": None}
TOP_UNSUPPORTED = ("pipeline", "tensor_parallel", "sequence_parallel_size", "compression_training", "data_efficiency",
                   "curriculum_learning", "sparse_attention", "hybrid_engine", "autotuning", "elasticity",
                   "torch_autocast")
# DeepSpeed's `compile` section tunes engine.compile(), which the training script calls (the section alone
# compiles nothing); its one feature is DeepCompile's graph passes. ember's `compile: true` is a bool.
COMPILE_KEYS = ("deepcompile", "autoep_non_moe", "free_activation", "free_activation_threshold", "offload_activation",
                "offload_activation_pin_memory", "offload_opt_states", "double_buffer", "symmetric_memory",
                "debug_log", "dump_graphs", "offload_parameters", "sync_before_reduce", "sync_after_reduce",
                "sync_before_allgather", "sync_after_allgather", "keep_int_input_tensors", "keep_all_input_tensors",
                "passes")
COMPILE = ("DeepSpeed compiles only when the script calls engine.compile(); `compile: true` runs each "
           "transformer block under torch.compile")
BATCH = {"train_micro_batch_size_per_gpu": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
         "train_batch_size": "global_batch_size", "gradient_clipping": "grad_clip"}
MARKERS = {*BATCH, "zero_optimization", "fp16", "bf16", "amp", *TOP_NO_EFFECT, "sparse_gradients"}
OPTIMIZER_DEFAULTS = {  # DeepSpeed's (FusedAdam, torch.optim.SGD, FusedLion): what unnamed params take
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "sgd": {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False},
    "lion": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0},
}
OPTIMIZER_EXTRA = {"adam": {"adam_w_mode", "torch_adam", "bias_correction", "amsgrad"}, "sgd": {"dampening"},
                   "lion": set()}
SCALER_KEYS = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "consecutive_hysteresis",
               "min_loss_scale")


def is_deepspeed(d: dict[str, Any]) -> bool:
    optimizer = d.get("optimizer")
    return bool(MARKERS & d.keys()) or isinstance(d.get("activation_checkpointing"), dict) or isinstance(
        d.get("tensorboard"), dict) or isinstance(d.get("compile"), dict) or (
        isinstance(optimizer, dict) and "params" in optimizer)


def from_deepspeed(d: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """ember's keys for `d` (which may mix both); appends what is wrong to `problems`."""
    notes: dict[str, list[str]] = {}
    deepspeed = is_deepspeed(d)
    d = dict(d)
    _batch(d, problems)
    if "zero_optimization" in d:
        _zero(d, d.pop("zero_optimization"), problems, notes)
    _precision(d, problems, notes)
    optimizer = d.get("optimizer")
    if isinstance(optimizer, dict) and ("params" in optimizer or (deepspeed and set(optimizer) <= {"type"})):
        d["optimizer"] = _optimizer(optimizer, problems, notes)
    scheduler = d.get("scheduler")
    if deepspeed and scheduler is None:
        d["scheduler"] = {"type": "constant"}
        notes.setdefault("no scheduler section: a constant lr, as in DeepSpeed", [])
    elif isinstance(scheduler, dict) and "max_steps" not in d:
        total = (scheduler.get("params") or {}).get("total_num_steps")
        if isinstance(total, int):
            d["max_steps"] = total
    for key in list(d):
        if key in TOP_NO_EFFECT:
            d.pop(key)
            notes.setdefault(TOP_NO_EFFECT[key], []).append(key)
        elif key == "activation_checkpointing" and isinstance(d[key], dict):
            d.pop(key)
            notes.setdefault(ACTIVATIONS, []).append(key)
        elif key == "tensorboard" and isinstance(d[key], dict):  # DeepSpeed's section; ember's key is a bool
            d[key] = bool(d[key].get("enabled", False))
            notes.setdefault("tensorboard: scalars go to RUN_DIR/tensorboard (output_path, job_name ignored)", [])
        elif key == "compile" and isinstance(d[key], dict):  # DeepSpeed's section; ember's key is a bool
            _compile(d.pop(key), problems, notes)
        elif key == "sparse_gradients":
            if d.pop(key):
                problems.append("sparse_gradients: true is not supported (gradients are dense)")
        elif key in TOP_UNSUPPORTED:
            d.pop(key)
            problems.append(f"{key}: a DeepSpeed feature ember does not implement")
    _report(notes)
    return d


def _compile(section: dict, problems: list[str], notes: dict) -> None:
    for key, value in section.items():
        if key == "deepcompile" and value:
            problems.append("compile.deepcompile: true: DeepCompile (DeepSpeed's graph passes for ZeRO) is not "
                            "implemented; ember's `compile: true` runs each transformer block under torch.compile")
        elif key in COMPILE_KEYS:
            notes.setdefault(COMPILE, []).append(f"compile.{key}")
        else:
            problems.append(_unknown(f"compile.{key}", key, list(COMPILE_KEYS)))
    notes.setdefault(COMPILE, [])


def _set(d: dict, key: str, value: Any, source: str, problems: list[str]) -> None:
    """d[key] = value, unless the config already gives ember's key a different value."""
    if key in d and d[key] != value:
        problems.append(f"{source}: {value!r} contradicts {key}: {d[key]!r}")
    else:
        d[key] = value


def _batch(d: dict, problems: list[str]) -> None:
    # only train_batch_size (and maybe the accumulation): DeepSpeed derives the micro-batch at launch
    derive = isinstance(d.get("train_batch_size"), int) and not {"train_micro_batch_size_per_gpu",
                                                                   "micro_batch_size"} & d.keys()
    for ds_key, key in BATCH.items():
        if ds_key in d and (value := d.pop(ds_key)) != AUTO:  # "auto": ember's key, or its default, or derived
            if key == "grad_clip" and not value:
                value = None  # DeepSpeed's 0: no clipping
            _set(d, key, value, ds_key, problems)
    if derive:
        d["micro_batch_size"] = None  # train_batch_size / (accumulation x world), once the world is known


def _zero(d: dict, zero: Any, problems: list[str], notes: dict) -> None:
    if isinstance(zero, bool):  # DeepSpeed's deprecated form: true is stage 1
        _set(d, "zero_stage", int(zero), "zero_optimization", problems)
        notes.setdefault(f"zero_optimization: {str(zero).lower()} is stage {int(zero)} (DeepSpeed's old form)", [])
        return
    if not isinstance(zero, dict):
        problems.append(f"zero_optimization: {zero!r} is not a section or true/false")
        return
    if "stage" in zero:
        _set(d, "zero_stage", zero["stage"], "zero_optimization.stage", problems)
    for key, value in zero.items():
        where = f"zero_optimization.{key}"
        if key == "stage":
            continue
        if key in ("offload_optimizer", "offload_param"):
            if _offload(where, value, problems, notes):
                d["offload_optimizer" if key == "offload_optimizer" else "offload_params"] = True
        elif key in ("cpu_offload", "cpu_offload_param"):  # deprecated booleans
            if value:
                d["offload_optimizer" if key == "cpu_offload" else "offload_params"] = True
        elif key == "cpu_offload_use_pin_memory" or key in ZERO_NO_EFFECT:
            notes.setdefault(ZERO_NO_EFFECT.get(key, OFFLOAD), []).append(where)
        elif key in ZERO_OFF:
            if value != ZERO_OFF[key]:
                problems.append(f"{where}: {value!r}: ember does not implement this (ZeRO++/MiCS/ZenFlow)")
        else:
            problems.append(_unknown(where, key, [*ZERO_NO_EFFECT, *ZERO_OFF, "stage", "offload_optimizer",
                                                   "offload_param"]))


def _offload(where: str, section: Any, problems: list[str], notes: dict) -> bool:
    """True: offload to CPU. NVMe (ZeRO-Infinity) is refused, never ignored."""
    if not isinstance(section, dict):
        problems.append(f"{where}: {section!r} is not a section with a 'device'")
        return False
    device = section.get("device", "none")
    for key in section:
        if key in OFFLOAD_NO_EFFECT:
            notes.setdefault(OFFLOAD, []).append(f"{where}.{key}")
        elif key == "ratio" and section[key] != 1:
            problems.append(f"{where}.ratio: {section[key]!r}: partial offload is not supported (1.0 only)")
        elif key not in ("device", "ratio"):
            problems.append(_unknown(f"{where}.{key}", key, ["device", "ratio", *OFFLOAD_NO_EFFECT]))
    if device == "nvme":
        problems.append(f"{where}.device: 'nvme' (ZeRO-Infinity) is not supported: ember offloads to CPU memory "
                        "('cpu') or not at all ('none')")
    elif device not in ("cpu", "none", None):
        problems.append(f"{where}.device: {device!r} is not one of cpu, none")
    return device == "cpu"


def _enabled(section: Any, name: str, precision: Any, problems: list[str]) -> bool:
    """A precision section's `enabled`; "auto" follows ember's `precision` key: off by default, as in the HF
    Trainer without --fp16/--bf16."""
    if isinstance(section, bool):
        return section
    if not isinstance(section, dict):
        problems.append(f"{name}: {section!r} is not a section")
        return False
    value = section.get("enabled", False)
    return precision == name if value == AUTO else bool(value)


def _precision(d: dict, problems: list[str], notes: dict) -> None:
    fp16, bf16, amp = d.pop("fp16", None), d.pop("bf16", None), d.pop("amp", None)
    precision = d.get("precision")
    fp16_on = fp16 is not None and _enabled(fp16, "fp16", precision, problems)
    bf16_on = bf16 is not None and _enabled(bf16, "bf16", precision, problems)
    if fp16_on and bf16_on:
        problems.append("fp16.enabled, bf16.enabled: both are on; choose one")
    elif fp16_on or bf16_on:
        _set(d, "precision", "fp16" if fp16_on else "bf16", "fp16.enabled" if fp16_on else "bf16.enabled", problems)
    for name, section in (("fp16", fp16), ("bf16", bf16)):
        if isinstance(section, dict) and section.get("enabled") is False and precision == name:
            problems.append(f"{name}.enabled: false contradicts precision: {name}")
    if fp16 is not None:
        if fp16_on and isinstance(fp16, dict):
            d["loss_scaling"] = {k: v for k, v in fp16.items() if k in SCALER_KEYS and v != AUTO}
        for key, value in (fp16 if isinstance(fp16, dict) else {}).items():
            if value == AUTO and key != "enabled":
                problems.append(f"fp16.{key}: 'auto' has nothing to be derived from in ember; give a value")
            elif key == "auto_cast":
                notes.setdefault("the forward is autocast to fp16", []).append("fp16.auto_cast")
            elif key == "fp16_master_weights_and_grads" and value:
                problems.append("fp16.fp16_master_weights_and_grads: ember keeps fp32 master weights and grads")
            elif key not in (*SCALER_KEYS, "enabled", "fp16_master_weights_and_grads"):
                problems.append(_unknown(f"fp16.{key}", key, ["enabled", "auto_cast", *SCALER_KEYS]))
    if bf16 is not None:
        for key, value in (bf16 if isinstance(bf16, dict) else {}).items():
            if key in ("immediate_grad_update", "check_grad_overflow"):
                notes.setdefault("bf16 keeps fp32 master weights and grads", []).append(f"bf16.{key}")
            elif key in ("bf16_master_weights_and_grads", "bf16_optimizer_states") and value:
                problems.append(f"bf16.{key}: ember keeps fp32 master weights, grads and optimizer state")
            elif key not in ("enabled", "bf16_master_weights_and_grads", "bf16_optimizer_states"):
                problems.append(_unknown(f"bf16.{key}", key, ["enabled", "immediate_grad_update"]))
    if amp is not None and _enabled(amp, "amp", None, problems):
        problems.append("amp.enabled: Apex AMP is not supported; use fp16 (dynamic loss scaling) or bf16")


def _optimizer(section: dict, problems: list[str], notes: dict) -> dict:
    """DeepSpeed's {"type", "params"} -> ember's optimizer section; unnamed params take DeepSpeed's defaults."""
    from ember.train.config import OptimSpec

    name = str(section.get("type", "AdamW"))
    kind = name.lower()
    family = "adam" if kind in ("adam", "adamw") else kind
    if family not in OPTIMIZER_DEFAULTS:
        problems.append(f"optimizer.type: {name!r} is not supported (ember implements Adam, AdamW, SGD, Lion)")
        return {}
    for key in set(section) - {"type", "params", "legacy_fusion"}:
        problems.append(_unknown(f"optimizer.{key}", key, ["type", "params"]))
    params = dict(section.get("params") or {})
    out = dict(OPTIMIZER_DEFAULTS[family])
    for key, value in params.items():
        where = f"optimizer.params.{key}"
        if value == AUTO and key in out and hasattr(OptimSpec, key):
            out[key] = getattr(OptimSpec, key)  # what ember uses without an optimizer section
        elif value == AUTO:
            problems.append(f"{where}: 'auto' has nothing to be derived from in ember; give a value")
        elif key in out:
            out[key] = tuple(value) if key == "betas" else value
        elif key == "max_grad_norm":
            problems.append(f"{where}: clip with the top-level gradient_clipping (as DeepSpeed requires)")
        elif key not in OPTIMIZER_EXTRA[family]:
            problems.append(_unknown(where, key, [*out, *OPTIMIZER_EXTRA[family]]))
        elif key == "torch_adam":
            notes.setdefault(OPTIMIZERS, []).append(where)
        elif (key == "bias_correction" and value is False) or (key in ("amsgrad", "dampening") and value):
            problems.append(f"{where}: {value!r} is not supported")
    # DeepSpeed's "Adam" is AdamW (decoupled weight decay) unless adam_w_mode is false
    if kind == "adam" and params.get("adam_w_mode", True) is False:
        out["type"] = "adam"
    else:
        out["type"] = "adamw" if family == "adam" else family
    return out


def _unknown(where: str, key: str, valid: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
    return f"{where}: unknown key" + (f"; did you mean {near[0]!r}?" if near else "")


def _report(notes: dict[str, list[str]]) -> None:
    """One log line for the accepted keys with no effect: once per launch (torchrun's workers inherit the
    mark from the launching process) and on rank 0 only."""
    if not notes:
        return
    line = "DeepSpeed config: " + "; ".join(
        f"no effect in ember: {', '.join(keys)} ({why})" if keys else why for why, keys in notes.items())
    mark = hashlib.sha1(line.encode()).hexdigest()[:12]
    if os.environ.get("EMBER_DEEPSPEED_REPORTED") == mark or os.environ.get("RANK", "0") != "0":
        return
    os.environ["EMBER_DEEPSPEED_REPORTED"] = mark
    logger.info("%s", line)
