"""safetensors <-> model parameters, by Hugging Face parameter name.

Every parameter (or row-slice of a merged projection) has exactly the name
transformers gives it, so loading is a copy, export needs no adapter, and the
RL bridge can push trainer tensors into the engine by name.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ember.models.config import ModelConfig
from ember.models.layers import MergedLinear

logger = logging.getLogger(__name__)

# Tensors some checkpoints carry that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids", "attn.bias", "attn.masked_bias")


Index = tuple  # what part of a parameter an HF tensor is: param.data[index]


def hf_parameter_map(model: nn.Module) -> dict[str, tuple[nn.Parameter, Index]]:
    """HF name -> (parameter, index of the part of it that HF tensor is; () for all of it)."""
    names: dict[str, tuple[nn.Parameter, Index]] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if "lora" in module_name.split("."):  # a trainable LoRA adapter: not the base model's (PEFT's names)
            continue
        if hasattr(module, "hf_parameters"):  # e.g. stacked experts: one tensor per expert on disk
            names.update(module.hf_parameters(prefix))
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if getattr(module, "transposed_checkpoint", False) and param.dim() == 2:
                param.transposed_checkpoint = True  # checkpoints hold it as [in, out]
            if isinstance(module, MergedLinear) and not module.fused_checkpoint:
                parent = module_name.rpartition(".")[0]
                start = 0
                for shard, size in zip(module.shard_names, module.output_sizes):
                    names[f"{parent}.{shard}.{param_name}"] = (param, (slice(start, start + size),))
                    start += size
            else:
                names[f"{prefix}{param_name}"] = (param, ())
    return names


def _target(param: nn.Parameter, index: Index) -> torch.Tensor:
    target = param.data[index]
    return target.t() if getattr(param, "transposed_checkpoint", False) else target


def _key(param: nn.Parameter, index: Index) -> tuple[int, str]:
    return id(param), repr(index)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names (tied weights once, as HF saves them)."""
    out, seen = {}, set()
    for name, (param, index) in hf_parameter_map(model).items():
        if _key(param, index) in seen:
            continue
        seen.add(_key(param, index))
        out[name] = _target(param, index)
    return out


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor, str]],
    strict: bool = True,
) -> set[str]:
    """Copy `(name, tensor, source)` triples into the model; returns the names loaded.

    With `strict`, every parameter must be covered; a shape mismatch is always an
    error naming the tensor and the file it came from.
    """
    pmap = hf_parameter_map(model)
    # Module names (e.g. a trainer's state dict: `...qkv_proj.weight`) are accepted too.
    aliases = {name.removeprefix("module."): (p, ()) for name, p in model.named_parameters()}
    loaded: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor, source in weights:
            entry = pmap.get(name) or aliases.get(name)
            if entry is None:
                if not name.endswith(_IGNORED_SUFFIXES):
                    unexpected.append(name)
                continue
            target = _target(*entry)
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)
            loaded.add(name)
            if name in aliases and name not in pmap:  # a merged parameter covers all its HF names
                loaded.update(n for n, (p, _) in pmap.items() if p is entry[0])
    if unexpected:
        logger.warning("ignored %d unexpected tensors, e.g. %s", len(unexpected), unexpected[:3])
    if strict:
        covered = {_key(p, i) for n, (p, i) in pmap.items() if n in loaded}
        missing = [n for n, (p, i) in pmap.items() if _key(p, i) not in covered]
        if missing:
            raise ValueError(
                f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}"
            )
    return loaded


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"model: {str(model_dir)!r} has no *.safetensors weight files")
    for f in files:
        if not f.is_file():
            raise ValueError(f"weight file {str(f)!r} is missing")
    return files


def iter_safetensors(files: list[Path], label: str = "", keep=None) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Every tensor of the files (whose name `keep(name)` accepts, if given), with a progress bar on stderr
    (a large model takes a while)."""
    with progress(f"loading {label}".strip(), unit="file", total=len(files), disable=len(files) < 2) as bar:
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        if keep is None or keep(name):
                            yield name, f.get_tensor(name), str(path)
            except (SafetensorError, OSError) as e:
                raise ValueError(f"weight file {str(path)!r} is corrupt or unreadable: {e}") from None
            bar.update()


class LazyTensors:
    """The files' tensors whose name `keep(name)` accepts, by name, each read from its file only when taken
    (`pop`): a caller that takes them a few at a time holds no more than those."""

    def __init__(self, files: list[Path], keep):
        self._where: dict[str, Path] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    self._where.update((name, path) for name in f.keys() if keep(name))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"weight file {str(path)!r} is corrupt or unreadable: {e}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self):
        return iter(list(self._where))

    def pop(self, name: str) -> torch.Tensor:
        path = self._where.pop(name)
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)


def progress(description: str, **kwargs):
    """A tqdm bar on stderr for load-time work, shown once it has lasted half a second."""
    from tqdm.auto import tqdm

    return tqdm(desc=description, file=sys.stderr, leave=False, dynamic_ncols=True, delay=0.5, **kwargs)


def empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model for `config`, built on the meta device and given (uninitialised) storage."""
    from ember.models import model_class

    with torch.device("meta"):
        model = model_class(config.architecture)(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()  # to_empty() unties shared tensors
    return model


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, ModelConfig]:
    """Build the model for an HF directory or a GGUF file on the meta device, then fill it."""
    from ember.models.gguf import find_gguf
    from ember.models.quant_formats import QUANTIZED_SUFFIXES, checkpoint_quantization, load_quantized_linears

    if (gguf_file := find_gguf(model_dir)) is not None:
        from ember.models.gguf import load_gguf

        return load_gguf(gguf_file, dtype, torch.device(device))
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model: {str(model_dir)!r} is not a directory or a .gguf file")
    config = ModelConfig.from_dir(model_dir)
    device = torch.device(device)
    torch_dtype = config.resolve_dtype(dtype, device)
    files = safetensors_files(model_dir)
    model = empty_model(config, torch_dtype, device)
    # BERT checkpoints come with and without the "bert." prefix; a pooler is not used for embeddings.
    weights = ((n.removeprefix("bert."), t, src) for n, t, src in iter_safetensors(files, model_dir.name)
               if not n.startswith(("pooler.", "bert.pooler.", "cls.")))
    if config.family.text_tower:
        weights = _text_tower(weights, config.architecture)
    if config.family.moe == "gpt_oss":
        weights = _mxfp4_experts(weights, torch_dtype)
    quant = checkpoint_quantization(config.raw, str(model_dir / "config.json"))
    if quant is not None:  # GPTQ / AWQ: packed tensors become quantized linears, the rest loads as usual
        weights = list(weights)
        packed = {n: t for n, t, _ in weights if n.endswith(QUANTIZED_SUFFIXES)}
        load_quantized_linears(model, packed, quant, torch_dtype, str(model_dir))
        model.to(device)  # the quantized linears were built on CPU from the files
        weights = [w for w in weights if not w[0].endswith(QUANTIZED_SUFFIXES)]
    load_weights(model, weights)
    model.eval()
    return model, config


def _text_tower(weights, architecture: str):
    """A multimodal checkpoint's text model under the names of its text-only class: transformers 4's
    `language_model.model.*` and 5's `model.language_model.*` become `model.*`; the vision tower and
    projector are left out (ember serves text)."""
    logger.info("%s: loading its text model; images are not supported", architecture)
    for name, tensor, source in weights:
        if "vision_tower" in name or "multi_modal_projector" in name:
            continue
        for prefix, replacement in (("language_model.model.", "model."), ("model.language_model.", "model."),
                                    ("language_model.lm_head.", "lm_head.")):
            if name.startswith(prefix):
                name = replacement + name[len(prefix):]
                break
        yield name, tensor, source


def _mxfp4_experts(weights, dtype: torch.dtype):
    """gpt-oss's original checkpoints hold the experts in MXFP4 (`*_blocks` + `*_scales`): each pair becomes
    the dense tensor its HF name stands for, in the compute dtype."""
    from ember.models.moe import dequantize_mxfp4

    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor, source in weights:
        base, _, part = name.rpartition("_")
        if part not in ("blocks", "scales") or not base.endswith(("gate_up_proj", "down_proj")):
            yield name, tensor, source
            continue
        pair = pending.setdefault(base, {})
        pair[part] = tensor
        if len(pair) == 2:
            del pending[base]
            yield base, dequantize_mxfp4(pair["blocks"], pair["scales"], dtype), source
    if pending:
        raise ValueError(f"MXFP4 tensors without their other half, e.g. {next(iter(pending))}")


def init_random_weights(model: nn.Module, std: float) -> None:
    """Every Linear/Embedding weight ~ N(0, std), norms 1, biases 0 (the benchmark workloads' recipe)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std)


def write_random_model(out_dir: str | Path, hf_config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       std: float = 0.02) -> None:
    """An HF-format directory (config.json, model.safetensors) of a random-init model for `hf_config`:
    every Linear/Embedding weight ~ N(0, std), norms 1 (the benchmark workloads' recipe). Benchmark
    models and RL's from-scratch policies start here."""
    from ember.models import model_class

    config = ModelConfig.from_hf(dict(hf_config))
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = model_class(config.architecture)(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    init_random_weights(model, std)
    save_model(model, config, out_dir, dtype=dtype)


def save_model(model: nn.Module, config: ModelConfig, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json and model.safetensors in HF format."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.to(dtype) if dtype else v).detach().cpu().contiguous()
        for k, v in hf_state_dict(model).items()
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf = dict(config.raw)
    hf["architectures"] = [config.architecture]
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
