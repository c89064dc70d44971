"""LoRA adapters in PEFT's format, and where they land on ember's linear layers.

The format is the one HF PEFT writes and vLLM reads: `adapter_config.json` (r, lora_alpha,
target_modules, use_rslora, ...) and `adapter_model.safetensors`, whose keys are
`base_model.model.<HF module name>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]).
An adapted layer computes `W x + scaling * B (A x)`. ember's merged projections (qkv_proj,
gate_up_proj) hold several HF modules as row blocks: an adapter on q_proj adds to the rows of
qkv_proj that q_proj is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class LoRAAdapter:
    """One adapter as read from disk: HF module name -> (A [r, in], B [out, r]), and its scaling."""

    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: dict


@dataclass(frozen=True)
class Target:
    """Where an HF module's adapter lands: rows [start, start + size) of `module`, its shard `shard`
    (of `num_shards`), whose input is `in_features` wide. Sizes are the whole model's: a
    tensor-parallel rank's module holds only its piece of them (ember.models.tensor_parallel.lora_piece)."""

    module_name: str
    module: nn.Module
    shard: int
    start: int
    size: int
    in_features: int
    num_shards: int = 1


def _linear_types() -> tuple[type, ...]:
    from ember.models.layers import Linear
    from ember.models.quant import QuantizedLinear

    return Linear, QuantizedLinear


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """Every HF module name an adapter may target in the decoder layers (not the embeddings or the
    LM head), with the ember module and row block it is."""
    targets: dict[str, Target] = {}
    for name, module in model.named_modules():
        if not isinstance(module, _linear_types()) or ".layers." not in f".{name}":
            continue
        split = getattr(module, "tp_split", None)  # a tensor-parallel piece: the whole module's sizes
        in_features = split.in_features if split else module.in_features
        sizes = list(split.sizes) if split else getattr(module, "output_sizes", None)
        shards = getattr(module, "shard_names", None)
        if shards and sizes and not getattr(module, "fused_checkpoint", False):
            parent = name.rpartition(".")[0]
            start = 0
            for i, (shard, size) in enumerate(zip(shards, sizes)):
                targets[f"{parent}.{shard}"] = Target(name, module, i, start, size, in_features, len(shards))
                start += size
        else:
            targets[name] = Target(name, module, 0, 0, sum(sizes) if split else module.out_features, in_features)
    return targets


def module_shards(module: nn.Module) -> list[int]:
    """The row-block sizes of a (merged) projection, as `lora_targets` numbers its shards."""
    sizes = getattr(module, "output_sizes", None)
    if sizes and getattr(module, "shard_names", None) and not getattr(module, "fused_checkpoint", False):
        return list(sizes)
    return [module.out_features]


def _module_name(key: str) -> tuple[str, str] | None:
    """'base_model.model.X.lora_A.weight' (or '.lora_A.default.weight') -> (X, 'A')."""
    if not key.startswith(_PREFIX):
        return None
    body = key[len(_PREFIX):]
    for part in ("A", "B"):
        for suffix in (f".lora_{part}.weight", f".lora_{part}.default.weight"):
            if body.endswith(suffix):
                return body[: -len(suffix)], part
    return None


def read_adapter(path: str | Path, max_rank: int | None = None,
                 targets: dict[str, Target] | None = None) -> LoRAAdapter:
    """Read and check a PEFT adapter directory; ValueError naming what is wrong (a missing file, an
    unsupported option, a rank over `max_rank`, a module the model does not have, a shape that is not
    this base model's)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"lora_path: {str(path)!r} has no {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a PEFT adapter)")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"lora_path: {ADAPTER_CONFIG} of {str(path)!r} is not valid JSON ({e})") from None
    _check_config(config, path)
    rank = int(config["r"])
    if max_rank is not None and rank > max_rank:
        raise ValueError(f"lora_path: {str(path)!r} has rank {rank}, more than max_lora_rank={max_rank}")
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"lora_path: {ADAPTER_WEIGHTS} of {str(path)!r} is unreadable ({e})") from None
    weights = _pair_up(tensors, path)
    wrong = sorted({a.shape[0] for a, _ in weights.values()} - {rank})
    if wrong:
        raise ValueError(f"lora_path: {str(path)!r} has tensors of rank {wrong}, not its adapter_config.json "
                         f"r={rank}")
    if targets is not None:
        _check_shapes(weights, targets, path)
    return LoRAAdapter(rank, scaling, weights, config)


def check_weights(tensors: dict[str, torch.Tensor], targets: dict[str, Target], label: str
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT-named A/B tensors (e.g. pushed by a trainer) paired up per module and checked against the model."""
    weights = _pair_up(tensors, Path(label))
    _check_shapes(weights, targets, Path(label))
    return weights


def _check_config(config: dict, path: Path) -> None:
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"lora_path: {str(path)!r} is a {config.get('peft_type')} adapter, not LoRA")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise ValueError(f"lora_path: {str(path)!r}: adapter_config.json r={config.get('r')!r} must be an integer >= 1")
    for key, allowed in (("bias", (None, "none")), ("use_dora", (None, False)), ("modules_to_save", (None, [])),
                         ("rank_pattern", (None, {})), ("alpha_pattern", (None, {}))):
        if config.get(key) not in allowed:
            raise ValueError(f"lora_path: {str(path)!r}: {key}={config[key]!r} is not supported "
                             "(ember serves plain LoRA on the decoder layers' linear projections)")


def _pair_up(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = _module_name(key)
        if parsed is None:
            raise ValueError(f"lora_path: {str(path)!r}: tensor {key!r} is not a LoRA A/B weight of a module "
                             "(embedding or LM-head adapters and saved modules are not supported)")
        parts.setdefault(parsed[0], {})[parsed[1]] = tensor
    weights = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"lora_path: {str(path)!r}: module {module!r} has lora_{'A' if 'A' in ab else 'B'} only")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"lora_path: {str(path)!r}: module {module!r} has A {tuple(a.shape)} and B "
                             f"{tuple(b.shape)}, not [r, in] and [out, r]")
        weights[module] = (a, b)
    if not weights:
        raise ValueError(f"lora_path: {str(path)!r} holds no LoRA weights")
    return weights


def _check_shapes(weights: dict, targets: dict[str, Target], path: Path) -> None:
    for module, (a, b) in weights.items():
        target = targets.get(module)
        if target is None:
            raise ValueError(f"lora_path: {str(path)!r} adapts {module!r}, which this model does not have as a "
                             f"linear projection (e.g. {next(iter(targets), 'none')!r})")
        in_features = target.in_features
        if a.shape[1] != in_features or b.shape[0] != target.size:
            raise ValueError(f"lora_path: {str(path)!r}: {module!r} is [{b.shape[0]} x {a.shape[1]}] in the adapter "
                             f"but [{target.size} x {in_features}] in this model (an adapter of another base model?)")


# ---- training ---------------------------------------------------------------------------------------
class TrainableLoRA(nn.Module):
    """A trainable adapter on one (merged) projection: for each adapted HF module (a shard of the
    projection's rows), A [r, in] and B [size, r]. B starts at zero (as PEFT's default), so training
    starts from the base model exactly. Attached as the projection's `lora`; the base stays frozen."""

    is_lora_adapter = True  # (the HF parameter map leaves adapters out of the base model's names)

    def __init__(self, module: nn.Module, shards: dict[int, str], rank: int, alpha: float, dropout: float,
                 use_rslora: bool = False):
        super().__init__()
        self.sizes = module_shards(module)
        self.names = dict(sorted(shards.items()))  # shard -> HF module name (its last component)
        device = next(module.parameters(), torch.empty(0)).device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for shard, name in self.names.items():
            a = torch.empty(rank, module.in_features, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's initialisation of A
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(self.sizes[shard], rank, device=device))
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True  # off: the base model's output (a DPO run's reference)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B (A x) for every row block (zeros where a shard is not adapted)."""
        h = self.dropout(x)
        parts = []
        for shard, size in enumerate(self.sizes):
            name = self.names.get(shard)
            if name is None:
                parts.append(h.new_zeros(*h.shape[:-1], size))
            else:
                a, b = self.lora_A[name], self.lora_B[name]
                parts.append((h @ a.to(h.dtype).t()) @ b.to(h.dtype).t())
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out * self.scaling

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.delta(x) if self.enabled else y


ALL_LINEAR = "all-linear"


def add_trainable_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                       target_modules: tuple[str, ...] | str = ALL_LINEAR, use_rslora: bool = False) -> list[str]:
    """Freeze the model and attach trainable adapters to the targeted projections (by HF module name,
    PEFT's rule: a name matches when it is the module's last component; "all-linear": every decoder
    projection). Returns the adapted HF module names; ValueError if a target matches nothing."""
    targets = lora_targets(model)
    wanted = None if target_modules == ALL_LINEAR else set(target_modules)
    chosen = {name: t for name, t in targets.items() if wanted is None or name.rsplit(".", 1)[-1] in wanted}
    if wanted is not None:
        missing = wanted - {name.rsplit(".", 1)[-1] for name in chosen}
        if missing:
            known = sorted({name.rsplit(".", 1)[-1] for name in targets})
            raise ValueError(f"lora.target_modules: {sorted(missing)} match no projection of this model "
                             f"(it has {known})")
    for p in model.parameters():
        p.requires_grad_(False)
    by_module: dict[str, dict[int, str]] = {}
    modules: dict[str, nn.Module] = {}
    for name, t in chosen.items():
        by_module.setdefault(t.module_name, {})[t.shard] = name.rsplit(".", 1)[-1]
        modules[t.module_name] = t.module
    for module_name, shards in by_module.items():
        modules[module_name].lora = TrainableLoRA(modules[module_name], shards, rank, alpha, dropout, use_rslora)
    return sorted(chosen)


def trainable_adapters(model: nn.Module) -> dict[str, TrainableLoRA]:
    """Module name (without wrappers' prefixes) -> its trainable adapter."""
    return {name.removeprefix("module.").removesuffix(".lora"): m for name, m in model.named_modules()
            if isinstance(m, TrainableLoRA)}


def adapter_tensors(model: nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's tensors of a (possibly wrapped and sharded) model's adapters, from its gathered state dict."""
    return adapter_state(trainable_adapters(model), {k.removeprefix("module."): v for k, v in full_state.items()})


def adapter_state(adapters: dict[str, TrainableLoRA], full_state: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """PEFT's tensors (base_model.model.<HF module>.lora_A.weight / lora_B.weight) of the adapters, read
    from the modules or, for a sharded model, from its gathered full state dict (module-name keys)."""
    out = {}
    for module_name, adapter in adapters.items():
        parent = module_name.rpartition(".")[0]
        merged = len(adapter.sizes) > 1
        for name in adapter.names.values():
            hf = f"{parent}.{name}" if merged else module_name
            for part in ("A", "B"):
                if full_state is not None:
                    tensor = full_state[f"{module_name}.lora.lora_{part}.{name}"]
                else:
                    tensor = getattr(adapter, f"lora_{part}")[name]
                out[f"{_PREFIX}{hf}.lora_{part}.weight"] = tensor.detach().float().cpu().contiguous()
    return out


def save_adapter(tensors: dict[str, torch.Tensor], out_dir: str | Path, rank: int, alpha: float, dropout: float,
                 target_modules: list[str], base_model: str | None, use_rslora: bool = False) -> Path:
    """Write a PEFT adapter directory (what HF PEFT, vLLM and ember load)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(target_modules), "bias": "none", "use_rslora": use_rslora, "use_dora": False,
        "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": base_model, "init_lora_weights": True,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


@torch.no_grad()
def merge_adapter(model: nn.Module, path: str | Path) -> None:
    """Add a PEFT adapter's scaling * B @ A into the weights it adapts (a merged export)."""
    targets = lora_targets(model)
    adapter = read_adapter(path, targets=targets)
    for module, (a, b) in adapter.weights.items():
        target = targets[module]
        weight = target.module.weight
        delta = (b.float() @ a.float()) * adapter.scaling
        weight[target.start:target.start + target.size] += delta.to(weight.dtype)
