"""ZeRO-2/3 models that start sharded: built on the meta device, sharded, then each rank materialises
its own shard only (DeepSpeed's zero.Init, torchtitan's meta-device init).

No rank ever holds the whole model: a checkpoint streams one HF tensor at a time into the parameter it
belongs to, and a parameter's full tensor lives only until its last piece has arrived and the rank
has copied out its shard. A from-scratch model draws each parameter's values from the same seeded
generator, in the same order, as an unsharded run (`init_random_weights`), so its losses equal one.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ember.models import ModelConfig, model_class
from ember.models.loader import (
    _IGNORED_SUFFIXES,
    hf_parameter_map,
    progress,
    safetensors_files,
)

logger = logging.getLogger(__name__)


def starts_sharded(config) -> bool:
    """FSDP stages (2, 3) of a whole model; LoRA (a frozen, possibly quantized base) and expert
    parallelism (experts sharded by hand) load whole and shard after."""
    return config.zero_stage >= 2 and config.lora is None and not config.expert_parallel


def meta_model(model_config: ModelConfig) -> nn.Module:
    with torch.device("meta"):
        return model_class(model_config.architecture)(model_config).train()


def _set_shard(param: nn.Parameter, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into a sharded (DTensor) parameter, without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        param.data.copy_(full)
        return
    local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(local.to_local())


@torch.no_grad()
def materialize(model: nn.Module, config, device: torch.device) -> None:
    """Give a sharded meta model its storage, then its values: `config.model.path`'s weights, or the
    seeded random initialisation."""
    before = len(list(model.parameters()))
    model.to_empty(device=device)
    if len(list(model.parameters())) != before:  # tied embeddings must stay one parameter
        raise RuntimeError("materializing the sharded model untied its shared parameters")
    if config.model.path is None:
        torch.manual_seed(config.seed)
        for name, param in model.named_parameters():
            full = torch.empty(param.shape, dtype=param.dtype)
            if name.endswith("norm.weight"):
                full.fill_(1.0)
            elif name.endswith(".bias"):
                full.zero_()
            else:
                full.normal_(0.0, config.model.init_std)
            _set_shard(param, full)
        return
    _load_sharded(model, Path(config.model.path))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_tensors(files: list[Path], label: str = "") -> Iterator[tuple[str, torch.Tensor, str]]:
    """Every tensor of the safetensors files, read one at a time into memory of its own. (safetensors'
    reader maps the file, and every page it touches stays in the process's resident set until the file
    is closed: a whole file's worth beside this rank's shard. The format is an 8-byte header length, a
    JSON header of dtype/shape/offsets, then the data.)"""
    with progress(f"loading {label}".strip(), unit="file", total=len(files), disable=len(files) < 2) as bar:
        for path in files:
            with open(path, "rb") as f:
                try:
                    (size,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(size))
                except (struct.error, ValueError) as e:
                    raise ValueError(f"weight file {str(path)!r} is corrupt or unreadable: {e}") from None
                entries = sorted(((n, e) for n, e in header.items() if n != "__metadata__"),
                                 key=lambda item: item[1]["data_offsets"][0])
                for name, entry in entries:
                    dtype = _DTYPES.get(entry["dtype"])
                    if dtype is None:
                        raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which ember does not load")
                    begin, end = entry["data_offsets"]
                    data = bytearray(end - begin)
                    f.seek(8 + size + begin)
                    if f.readinto(data) != len(data):
                        raise ValueError(f"weight file {str(path)!r} is truncated (tensor {name!r})")
                    tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
                    yield name, tensor.reshape(entry["shape"]), str(path)
            bar.update()


def _release_freed_memory() -> None:
    """Give the freed full tensors back to the OS now: glibc keeps freed blocks below its (adaptive)
    mmap threshold in the heap, which would add tens of MiB of retained memory per rank."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _load_sharded(model: nn.Module, model_dir: Path) -> None:
    pmap = hf_parameter_map(model)
    parts: dict[int, set[str]] = {}  # parameter -> the pieces (row slices) it is made of
    for name, (param, index) in pmap.items():
        parts.setdefault(id(param), set()).add(repr(index))
    pending: dict[int, tuple[torch.Tensor, set[str]]] = {}
    done: set[int] = set()
    for name, tensor, source in read_tensors(safetensors_files(model_dir), model_dir.name):
        entry = pmap.get(name)
        if entry is None:
            if not name.endswith(_IGNORED_SUFFIXES):
                logger.warning("%s: ignored unexpected tensor %s", source, name)
            continue
        param, index = entry
        if id(param) in done:  # a tied parameter's second name
            continue
        full, missing = pending.setdefault(id(param), (torch.empty(param.shape, dtype=param.dtype),
                                                       set(parts[id(param)])))
        target = full[index]
        target = target.t() if getattr(param, "transposed_checkpoint", False) else target
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(target.shape)}")
        target.copy_(tensor)
        missing.discard(repr(index))
        if not missing:
            _set_shard(param, full)
            del pending[id(param)], full, target, tensor  # (the last references: freed before the trim)
            done.add(id(param))
            _release_freed_memory()
    absent = [n for n, (p, _) in pmap.items() if id(p) not in done]
    if absent:
        raise ValueError(f"{model_dir}: checkpoint is missing {len(absent)} tensors, e.g. {absent[:5]}")
