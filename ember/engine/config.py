"""Engine configuration: small frozen dataclasses, validated once when built."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ember.models.config import DTYPE_CHOICES

POLICIES = ("fcfs", "priority")


def _check(condition: bool, name: str, value, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {value!r} is invalid ({expected})")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Memory for K/V blocks; None picks min(4 GiB, a quarter of available memory).
    kv_cache_gib: float | None = None
    enable_prefix_caching: bool = True
    # "int8": K/V stored in 8 bits with a bf16 scale per token and head (~2x the tokens per GiB).
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        _check(self.block_size in (8, 16, 32, 64, 128), "block_size", self.block_size, "one of 8, 16, 32, 64, 128")
        _check(self.kv_cache_dtype in ("auto", "int8"), "kv_cache_dtype", self.kv_cache_dtype, "auto or int8")
        if self.kv_cache_gib is not None:
            _check(self.kv_cache_gib > 0, "kv_cache_gib", self.kv_cache_gib, "must be > 0")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    # Tokens per step (the forward's batch size in tokens): decodes first, then prompt chunks.
    max_num_batched_tokens: int = 2048
    # None: the model's max_position_embeddings.
    max_model_len: int | None = None
    policy: str = "fcfs"
    enable_chunked_prefill: bool = True

    def __post_init__(self):
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be >= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens, "must be >= 1")
        if self.max_model_len is not None:
            _check(self.max_model_len >= 2, "max_model_len", self.max_model_len, "must be >= 2")
        _check(self.policy in POLICIES, "policy", self.policy, f"one of {POLICIES}")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None  # defaults to the model directory
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    chat_template: str | None = None  # a template string overriding the model's
    attention_backend: str = "auto"  # auto | cpu_paged | torch_paged
    # {"method": "ngram", "num_tokens": k, "max_ngram": n} or {"method": "draft", "model": DIR, "num_tokens": k}
    speculative: dict | None = None
    # Weight-only quantization at load time: None | "int8" (per channel) | "int4" (per group).
    # GPTQ/AWQ checkpoints are recognised from their config.json and need none of this.
    quantization: str | None = None
    quantization_group_size: int = 64
    quantize_lm_head: bool = True
    quantize_embeddings: bool = True
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        _check(self.dtype in DTYPE_CHOICES, "dtype", self.dtype, f"one of {DTYPE_CHOICES}")
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device", self.device, "auto, cpu, cuda or cuda:N",
        )
        if self.quantization is not None:
            self.quant_config()  # validates method and group size

    def quant_config(self):
        from ember.models.quant import QuantConfig

        if self.quantization is None:
            return None
        return QuantConfig(self.quantization, self.quantization_group_size, self.quantize_lm_head,
                           self.quantize_embeddings)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        """Flat keyword arguments (as `LLM(...)` and the CLI take them) -> nested config."""
        parts = {}
        for sub_name, sub_cls in (("cache", CacheConfig), ("scheduler", SchedulerConfig)):
            names = {f.name for f in fields(sub_cls)}
            parts[sub_name] = sub_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        top = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - top)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=str(model), **kwargs, **parts)
