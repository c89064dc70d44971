"""ModelConfig: the fields of an HF `config.json` that ember's models read, validated once."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
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
from ember.choices import DTYPE_CHOICES  # noqa: E402  (re-exported)


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Per-pair divisors of the frequencies as a GGUF stores Llama 3's scaling (its `rope_freqs` tensor).
    freq_factors: tuple[float, ...] = ()
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None  # cos/sin scaling (yarn, longrope); None: derived from factor
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # longrope: per-pair divisors within the original context, and beyond it
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", params: dict | None = None) -> "RopeConfig":
        """From a config dict; `params`: one layer type's entry of a per-layer-type `rope_parameters`."""
        if params is None:
            # transformers >= 5 writes `rope_parameters` (theta inside); older files
            # write `rope_theta` beside an optional `rope_scaling` dict.
            params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        original = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        factor = params.get("factor")
        if factor is None and rope_type in ("yarn", "longrope") and original:
            factor = hf.get("max_position_embeddings", original) / original
        optional = lambda key: None if params.get(key) is None else float(params[key])  # noqa: E731
        return cls(
            theta=theta,
            type=rope_type,
            factor=float(factor if factor is not None else 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(original or 8192),
            freq_factors=tuple(float(f) for f in params.get("freq_factors") or ()),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            truncate=bool(params.get("truncate", True)),
            attention_factor=optional("attention_factor"),
            mscale=optional("mscale"),
            mscale_all_dim=optional("mscale_all_dim"),
            short_factor=tuple(float(f) for f in params.get("short_factor") or ()),
            long_factor=tuple(float(f) for f in params.get("long_factor") or ()),
        )

    def attention_scaling(self) -> float:
        """The factor cos and sin are multiplied by (transformers' `attention_scaling`)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.type == "yarn":
            def mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            if self.mscale and self.mscale_all_dim:
                return mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
            return mscale(self.factor)
        if self.type == "longrope" and self.factor > 1.0:
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))
        return 1.0

    def inv_freq(self, dim: int, long: bool = False) -> torch.Tensor:
        """Per-pair rotation frequencies for `dim` rotated dimensions, computed as transformers does (fp32).
        `long`: longrope's factors for positions past the original context."""
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
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
        if self.type == "yarn":
            return self._yarn(dim)
        if self.type == "longrope":
            factors = self.long_factor if long else self.short_factor
            if len(factors) != len(inv_freq):
                raise ValueError(f"rope: longrope has {len(factors)} factors for {len(inv_freq)} frequencies")
            return 1.0 / (torch.tensor(factors, dtype=torch.float32) * self.theta**exponent)
        return inv_freq

    def _yarn(self, dim: int) -> torch.Tensor:
        """YaRN (arXiv:2309.00071): interpolate the low frequencies, keep the high ones, ramp between."""
        def correction_dim(rotations: float) -> float:
            return (dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
                2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no singularity
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = self.theta ** (torch.arange(0, dim, 2).float() / dim)
        return (1.0 / (self.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


@dataclass(frozen=True)
class LayerSpec:
    """What one layer's attention does differently (DESIGN: one per-layer attention spec, read once)."""

    sliding_window: int | None = None
    rope: RopeConfig | None = field(default_factory=RopeConfig)  # None: no rotary (SmolLM3's NoPE layers)
    rotary_dim: int | None = None  # partial rotary: the first rotary_dim dims of each head (None: all)


@dataclass(frozen=True)
class Family:
    """Where an architecture departs from Llama, as data (DESIGN: families differ by data)."""

    norm: str = "pre"  # pre: norm -> sublayer -> add; sandwich: norms before and after; post: after only
    norm_offset: bool = False  # Gemma's RMSNorm scales by (1 + weight)
    embed_scale: bool = False  # Gemma multiplies the embeddings by sqrt(hidden_size)
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3, Gemma 3); "full": over the projection (OLMo 2)
    qkv_bias: bool = False  # q/k/v biases whatever attention_bias says (Qwen2)
    fused_checkpoint: bool = False  # checkpoints hold qkv_proj / gate_up_proj fused (Phi-3)
    moe: str | None = None  # mixtral | qwen2_moe | qwen3_moe | gpt_oss
    sinks: bool = False  # a learned sink logit per head (gpt-oss)
    text_tower: bool = False  # a multimodal checkpoint whose text model ember loads (Gemma 3)


_GEMMA3 = Family(norm="sandwich", norm_offset=True, embed_scale=True, qk_norm="head")
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(),
    "Qwen2ForCausalLM": Family(qkv_bias=True),
    "MixtralForCausalLM": Family(moe="mixtral"),
    "Qwen2MoeForCausalLM": Family(qkv_bias=True, moe="qwen2_moe"),
    "Qwen3ForCausalLM": Family(qk_norm="head"),
    "Qwen3MoeForCausalLM": Family(qk_norm="head", moe="qwen3_moe"),
    "Gemma2ForCausalLM": Family(norm="sandwich", norm_offset=True, embed_scale=True),
    "Gemma3ForCausalLM": _GEMMA3,
    "Gemma3ForConditionalGeneration": replace(_GEMMA3, text_tower=True),
    "Phi3ForCausalLM": Family(fused_checkpoint=True),
    "Olmo2ForCausalLM": Family(norm="post", qk_norm="full"),
    "SmolLM3ForCausalLM": Family(),
    "GptOssForCausalLM": Family(moe="gpt_oss", sinks=True),
}


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
    rope: RopeConfig = field(default_factory=RopeConfig)  # the full-attention layers' (Gemma 3's local ones differ)
    layers: tuple[LayerSpec, ...] = ()  # one per layer; () : every layer plain (no window, `rope`, full rotary)
    family: Family = field(default_factory=Family)
    query_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # attention logits -> cap * tanh(logits / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the output logits (Gemma 2)
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
        if len(self.layers) != self.num_layers:
            object.__setattr__(self, "layers", tuple(LayerSpec(rope=self.rope) for _ in range(self.num_layers)))

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

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

        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"{source}: architectures={archs} is not supported "
                f"(supported: {', '.join(sorted(ARCHITECTURES))})"
            )
        family = FAMILIES.get(arch, Family())
        if family.text_tower:  # a multimodal checkpoint: its text model's config, nested
            hf = {**hf, **(hf.get("text_config") or {}), "architectures": archs}
        hf = {**{new: hf[old] for old, new in _ALIASES.items() if old in hf}, **hf}
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            num_layers = int(hf["num_hidden_layers"])
            head_dim = int(hf.get("head_dim") or hidden // num_heads)
            cfg = dict(
                architecture=arch,
                model_type=hf.get("model_type", ""),
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf.get("intermediate_size") or 4 * hidden),
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing required field {e.args[0]!r}") from None
        gpt2 = arch == "GPT2LMHeadModel"
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        bias = bool(hf.get("attention_bias", False))
        scalar = hf.get("query_pre_attn_scalar")
        rope = RopeConfig.from_hf(hf, source, _rope_params(hf, "full_attention"))
        return cls(
            **cfg,
            rms_norm_eps=float(hf.get("rms_norm_eps", hf.get("layer_norm_eps", 1e-6))),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gpt2)),
            qkv_bias=family.qkv_bias or bias,
            o_bias=bias and not family.qkv_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hf.get("hidden_act", hf.get("activation_function", "silu")),
            rope=rope,
            layers=_layer_specs(hf, num_layers, head_dim, rope, source),
            family=family,
            query_scale=None if scalar is None else float(scalar) ** -0.5,
            attn_softcap=hf.get("attn_logit_softcapping"),
            final_softcap=hf.get("final_logit_softcapping"),
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


# Field names of older configs (GPT-2) and of some families (Gemma) -> the names read above.
_ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
            "n_positions": "max_position_embeddings", "n_inner": "intermediate_size",
            "layer_norm_epsilon": "layer_norm_eps", "hidden_activation": "hidden_act"}


def _rope_params(hf: dict[str, Any], layer_type: str) -> dict[str, Any]:
    """The rope parameters of one layer type: transformers >= 5 may key `rope_parameters` by layer type
    (Gemma 3); older files write `rope_theta` (+ Gemma 3's `rope_local_base_freq`) beside `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    if layer_type in params or "full_attention" in params:
        return dict(params.get(layer_type) or params.get("full_attention") or {})
    params = {**(hf.get("rope_scaling") or {}), **params}
    if layer_type == "sliding_attention" and hf.get("rope_local_base_freq") is not None:
        return {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}  # Gemma 3: no scaling locally
    return params


def _layer_types(hf: dict[str, Any], num_layers: int) -> list[str]:
    """Each layer's attention: "sliding_attention" or "full_attention"."""
    window = hf.get("sliding_window")
    if hf.get("layer_types"):
        types = list(hf["layer_types"])
        if len(types) != num_layers:
            raise ValueError(f"config.json: layer_types has {len(types)} entries for {num_layers} layers")
        return types if window else ["full_attention"] * num_layers
    if not window:
        return ["full_attention"] * num_layers
    model_type = hf.get("model_type")
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        first = int(hf.get("max_window_layers", num_layers)) if hf.get("use_sliding_window", False) else num_layers
        return ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    pattern = {"gemma2": 2, "gemma3_text": hf.get("sliding_window_pattern", 6), "gemma3": hf.get("sliding_window_pattern", 6),
               "gpt_oss": 2}.get(model_type)
    if pattern:  # every pattern-th layer global, the others local
        return ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(num_layers)]
    return ["sliding_attention"] * num_layers  # Mistral, Phi-3: one window for every layer


def _layer_specs(hf: dict[str, Any], num_layers: int, head_dim: int, rope: RopeConfig,
                 source: str) -> tuple[LayerSpec, ...]:
    types = _layer_types(hf, num_layers)
    window = hf.get("sliding_window")
    local = RopeConfig.from_hf(hf, source, _rope_params(hf, "sliding_attention"))
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * float(partial)) if partial and float(partial) != 1.0 else None
    no_rope = hf.get("no_rope_layers")  # SmolLM3: 1 = rotary, 0 = none (NoPE)
    if no_rope is not None and len(no_rope) != num_layers:
        raise ValueError(f"{source}: no_rope_layers has {len(no_rope)} entries for {num_layers} layers")
    specs = []
    for i, kind in enumerate(types):
        sliding = kind == "sliding_attention"
        layer_rope = None if no_rope is not None and not no_rope[i] else (local if sliding else rope)
        specs.append(LayerSpec(int(window) if sliding else None, layer_rope, rotary_dim))
    return tuple(specs)
