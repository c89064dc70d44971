"""ModelConfig: the fields of an HF `config.json` that ember's models read, validated once."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Per-pair divisors of the frequencies as a GGUF stores Llama 3's scaling (its `rope_freqs` tensor).
    freq_factors: tuple[float, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "RopeConfig":
        # transformers >= 5 writes `rope_parameters` (theta inside); older files
        # write `rope_theta` beside an optional `rope_scaling` dict.
        params = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(
                f"{source}: rope scaling type {rope_type!r} is not supported "
                "(supported: default, linear, llama3)"
            )
        return cls(
            theta=theta,
            type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", 8192)
            ),
            freq_factors=tuple(float(f) for f in params.get("freq_factors") or ()),
        )

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Per-pair rotation frequencies, computed as transformers does (fp32)."""
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (self.theta**exponent)
        if self.freq_factors:
            if len(self.freq_factors) != len(inv_freq):
                raise ValueError(f"rope: {len(self.freq_factors)} frequency factors for {len(inv_freq)} frequencies")
            inv_freq = inv_freq / torch.tensor(self.freq_factors)
        if self.type == "linear":
            return inv_freq / self.factor
        if self.type == "llama3":
            old_len = self.original_max_position_embeddings
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (old_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return torch.where(is_medium, smoothed, scaled)
        return inv_freq


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # One entry per layer: the sliding attention window in tokens, or None.
    sliding_windows: tuple[int | None, ...] = ()
    rope: RopeConfig = field(default_factory=RopeConfig)
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config.json: num_attention_heads={self.num_heads} is not a multiple "
                f"of num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.sliding_windows) != self.num_layers:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head

    @classmethod
    def from_path(cls, path: str | Path) -> "ModelConfig":
        """The config of an HF directory or a GGUF file (or a directory holding one)."""
        from ember.models.gguf import find_gguf, open_gguf

        gguf_file = find_gguf(path)
        return open_gguf(gguf_file).config() if gguf_file is not None else cls.from_dir(path)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"model: {str(model_dir)!r} has no config.json")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(hf, source=str(path))

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        from ember.models import ARCHITECTURES

        hf = {**{new: hf[old] for old, new in _ALIASES.items() if old in hf}, **hf}
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"{source}: architectures={archs} is not supported "
                f"(supported: {', '.join(sorted(ARCHITECTURES))})"
            )
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            num_layers = int(hf["num_hidden_layers"])
            cfg = dict(
                architecture=arch,
                model_type=hf.get("model_type", ""),
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf.get("intermediate_size") or 4 * hidden),
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing required field {e.args[0]!r}") from None
        qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        gpt2 = arch == "GPT2LMHeadModel"
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            **cfg,
            rms_norm_eps=float(hf.get("rms_norm_eps", hf.get("layer_norm_eps", 1e-6))),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gpt2)),
            qkv_bias=qwen2 or bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)) and not qwen2,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hf.get("hidden_act", hf.get("activation_function", "silu")),
            sliding_windows=_sliding_windows(hf, num_layers),
            rope=RopeConfig.from_hf(hf, source),
            torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            raw=hf,
        )

    def resolve_dtype(self, dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
        if isinstance(dtype, torch.dtype):
            return dtype
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype: {dtype!r} is not one of {DTYPE_CHOICES}")
        if dtype != "auto":
            return _DTYPES[dtype]
        resolved = _DTYPES.get(str(self.torch_dtype).removeprefix("torch."), torch.float32)
        # fp16 matmuls are slow on CPUs; bf16 has the same size and range to spare.
        if resolved == torch.float16 and device.type == "cpu":
            return torch.bfloat16
        return resolved


# Field names of older configs (GPT-2) -> the names read above.
_ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
            "n_positions": "max_position_embeddings", "n_inner": "intermediate_size",
            "layer_norm_epsilon": "layer_norm_eps"}


def _sliding_windows(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if not window:
        return (None,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if hf.get("model_type") in ("qwen2", "qwen2_moe"):
        if not hf.get("use_sliding_window", False):
            return (None,) * num_layers
        first = int(hf.get("max_window_layers", num_layers))
        return tuple(window if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers
