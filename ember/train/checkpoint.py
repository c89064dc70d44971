"""Checkpoints with torch.distributed.checkpoint, and export to an HF directory.

One format for every stage and world size: the model and optimizer state keyed by
HF parameter names (DCP reshards on load), plus trainer state (step, scheduler,
RNG) and a copy of config.json and the tokenizer files, so a checkpoint is
self-contained and `export` needs nothing else.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from ember.models.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def _param_names(model: nn.Module, optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own numbering (group by group, as its state dict
    numbers them: not the model's order, where decayed and undecayed parameters interleave)."""
    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _zero1_state(model: nn.Module, optimizer) -> dict:
    """ZeroRedundancyOptimizer state, gathered and keyed by parameter name on every rank."""
    optimizer.consolidate_state_dict(to=0)
    payload = [None]
    if dist.get_rank() == 0:
        full = optimizer.state_dict()
        names = _param_names(model, optimizer)
        order = [i for group in full["param_groups"] for i in group["params"]]
        payload[0] = {
            "state": {names[i]: full["state"][i] for i in order if i in full["state"]},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
                             for g in full["param_groups"]],
        }
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _zero1_load(model: nn.Module, optimizer, named: dict) -> None:
    names = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: v for n, v in named["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _zero1_placeholder(model: nn.Module, optimizer) -> dict:
    """The structure DCP loads the named optimizer state into (full-size tensors)."""
    from ember.train.optim import state_template

    params = dict(zip(_param_names(model, optimizer), (p for g in optimizer.param_groups for p in g["params"])))
    state = {n: state_template(optimizer.optim, p) for n, p in params.items()}
    groups = []
    for g in optimizer.param_groups:
        ids = {id(p) for p in g["params"]}
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [n for n, p in params.items() if id(p) in ids]})
    return {"state": state, "param_groups": groups}


def _options(model: nn.Module) -> StateDictOptions:
    # A LoRA run's frozen base parameters are not checkpointed (it is the model the run started from; a QLoRA
    # base's quantized buffers are, as buffers), so loading
    # expects only the trainable tensors; a full run's load stays strict.
    strict = all(p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def state_dicts(model: nn.Module, optimizer, zero_stage: int) -> tuple[dict, dict]:
    if zero_stage == 1:
        model_sd, _ = get_state_dict(model, [], options=_options(model))
        return model_sd, _zero1_state(model, optimizer)
    return get_state_dict(model, optimizer, options=_options(model))


def save_checkpoint(path: Path, step: int, model: nn.Module, optimizer, scheduler, zero_stage: int,
                    model_config: ModelConfig, tokenizer_dir: str | None, config_dict: dict, is_main: bool) -> None:
    path = Path(path)
    model_sd, optim_sd = state_dicts(model, optimizer, zero_stage)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "dcp"))
    if is_main:
        state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": dist.get_world_size(),
                 "rng": torch.get_rng_state().tolist(), "train_config": config_dict}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # (dropout on the GPU draws from it)
            state["cuda_rng"] = torch.cuda.get_rng_state().tolist()
        (path / "trainer_state.json").write_text(json.dumps(state, default=str))
        hf = dict(model_config.raw)
        hf["architectures"] = [model_config.architecture]
        (path / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer_dir:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copy(src, path / name)
    dist.barrier()


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, zero_stage: int) -> int:
    """Restore in place; returns the step to continue from."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise ValueError(f"resume: {str(path)!r} is not an ember checkpoint (no trainer_state.json)")
    if zero_stage == 1:
        model_sd, _ = get_state_dict(model, [], options=_options(model))
        optim_sd = _zero1_placeholder(model, optimizer)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
    both = {"model": model_sd, "optim": optim_sd}
    dcp.load(both, checkpoint_id=str(path / "dcp"))
    if zero_stage == 1:
        set_state_dict(model, [], model_state_dict=both["model"], optim_state_dict={}, options=_options(model))
        _zero1_load(model, optimizer, both["optim"])
    else:
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"],
                       options=_options(model))
    state = json.loads(state_file.read_text())
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
    if "cuda_rng" in state and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(torch.tensor(state["cuda_rng"], dtype=torch.uint8))
    return int(state["step"])


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest `step-N` checkpoints under `root`; the one `latest` names
    and `final` are never deleted. Returns what was deleted."""
    root = Path(root)
    marker = root / "latest"
    protected = {marker.read_text().strip()} if marker.is_file() else set()
    steps = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    doomed = [p for p in steps[:-keep_last] if p.name not in protected]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32", merge: bool = False) -> Path:
    """A checkpoint -> an HF directory (config.json, model.safetensors, tokenizer files); one process.
    A LoRA run's checkpoint -> its PEFT adapter, or with `merge` the base model with the adapter merged."""
    from ember.models import model_class
    from ember.models.config import dtype_from_name
    from ember.models.loader import save_model

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / "trainer_state.json").is_file():
        raise ValueError(f"checkpoint: {str(checkpoint)!r} is not an ember checkpoint (no trainer_state.json)")
    train_config = json.loads((checkpoint / "trainer_state.json").read_text()).get("train_config") or {}
    if train_config.get("lora") is not None:
        return _export_lora(checkpoint, out_dir, train_config, dtype, merge)
    if merge:
        raise ValueError(f"merge: {str(checkpoint)!r} is a full-model checkpoint; there is no adapter to merge")
    config = ModelConfig.from_dir(checkpoint)
    with torch.device("meta"):
        model = model_class(config.architecture)(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    state = {name: tensor for name, tensor in model.state_dict().items()}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, checkpoint_id=str(checkpoint / "dcp"), no_dist=True)
    model.load_state_dict(state)
    save_model(model, config, out_dir, dtype=dtype_from_name(dtype))
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, out_dir / name)
    return out_dir


def _export_lora(checkpoint: Path, out_dir: Path, train_config: dict, dtype: str, merge: bool) -> Path:
    from ember.models import load_model
    from ember.models.config import dtype_from_name
    from ember.models.loader import save_model
    from ember.models.lora import merge_adapter

    adapter = checkpoint / "adapter"
    if not adapter.is_dir():
        raise ValueError(f"checkpoint: {str(checkpoint)!r} is a LoRA run's but has no adapter/ directory")
    if not merge:
        shutil.copytree(adapter, out_dir, dirs_exist_ok=True)
        return out_dir
    base = train_config["model"]["path"]
    model, config = load_model(base, dtype="float32")
    merge_adapter(model, adapter)
    save_model(model, config, out_dir, dtype=dtype_from_name(dtype))
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, out_dir / name)
    return out_dir
