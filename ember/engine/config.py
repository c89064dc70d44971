"""Engine configuration: small frozen dataclasses, validated once when built."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ember.choices import DTYPE_CHOICES, SPECULATIVE_METHODS

POLICIES = ("fcfs", "priority")


def _check(condition: bool, name: str, value, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {value!r} is invalid ({expected})")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_tokens: int = 3  # drafts per step
    max_ngram: int = 3
    min_ngram: int = 1
    model: str | None = None  # the draft model's directory (method "draft")

    def __post_init__(self):
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative.method: {self.method!r} is not one of {SPECULATIVE_METHODS}")
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"speculative.num_tokens: {self.num_tokens} must be in [1, 16]")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"speculative.max_ngram: {self.max_ngram} must be >= min_ngram ({self.min_ngram}) >= 1")
        if self.method == "draft" and not self.model:
            raise ValueError("speculative.model: required for method 'draft'")

    @classmethod
    def from_any(cls, value) -> "SpeculativeConfig | None":
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"method", "num_tokens", "max_ngram", "min_ngram", "model"}
            if unknown:
                raise ValueError(f"speculative: unknown keys {sorted(unknown)}")
            return cls(**value)
        raise ValueError(f"speculative: {value!r} is not a dict")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata={"help": "tokens per KV cache block: 8, 16, 32, 64 or 128"})
    kv_cache_gib: float | None = field(default=None, metadata={
        "help": "GiB of memory for KV blocks (none: min(4 GiB, a quarter of the available memory))"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV blocks of prompt prefixes computed before"})
    # "int8": K/V stored in 8 bits with a bf16 scale per token and head (~2x the tokens per GiB).
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "K/V storage: auto (the model's dtype) or int8 (about twice the tokens per GiB)"})

    def __post_init__(self):
        _check(self.block_size in (8, 16, 32, 64, 128), "block_size", self.block_size, "one of 8, 16, 32, 64, 128")
        _check(self.kv_cache_dtype in ("auto", "int8"), "kv_cache_dtype", self.kv_cache_dtype, "auto or int8")
        if self.kv_cache_gib is not None:
            _check(self.kv_cache_gib > 0, "kv_cache_gib", self.kv_cache_gib, "must be > 0")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=256, metadata={"help": "sequences running at once"})
    # Tokens per step (the forward's batch size in tokens): decodes first, then prompt chunks.
    max_num_batched_tokens: int = field(default=2048, metadata={
        "help": "tokens per engine step: decodes first, then prompt chunks"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "context length in tokens (none: the model's max_position_embeddings)"})
    policy: str = field(default="fcfs", metadata={
        "help": "scheduling order: fcfs (arrival), or priority (lowest request priority first)"})
    enable_chunked_prefill: bool = field(default=True, metadata={
        "help": "split long prompts over steps, so running sequences keep decoding"})

    def __post_init__(self):
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be >= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens, "must be >= 1")
        if self.max_model_len is not None:
            _check(self.max_model_len >= 2, "max_model_len", self.max_model_len, "must be >= 2")
        _check(self.policy in POLICIES, "policy", self.policy, f"one of {POLICIES}")


@dataclass(frozen=True)
class LoRAConfig:
    enable_lora: bool = field(default=False, metadata={
        "help": "serve LoRA adapters (PEFT format) over the base model, several in one batch"})
    max_loras: int = field(default=1, metadata={"help": "adapters held on the device at once (one step's limit)"})
    max_lora_rank: int = field(default=16, metadata={"help": "the largest adapter rank accepted"})
    max_cpu_loras: int | None = field(default=None, metadata={
        "help": "adapters kept read in memory, least recently used dropped first (none: max(4, 2 x max_loras))"})

    def __post_init__(self):
        _check(isinstance(self.max_loras, int) and self.max_loras >= 1, "max_loras", self.max_loras, "an integer >= 1")
        _check(isinstance(self.max_lora_rank, int) and 1 <= self.max_lora_rank <= 512, "max_lora_rank",
               self.max_lora_rank, "an integer in [1, 512]")
        _check(self.max_cpu_loras is None or (isinstance(self.max_cpu_loras, int) and self.max_cpu_loras >= self.max_loras),
               "max_cpu_loras", self.max_cpu_loras, f"none or an integer >= max_loras ({self.max_loras})")

    @property
    def cpu_capacity(self) -> int:
        return self.max_cpu_loras or max(4, 2 * self.max_loras)


@dataclass(frozen=True)
class EngineConfig:
    model: str = field(metadata={"help": "the model directory or .gguf file"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "a model directory or hub id whose tokenizer to use (none: the model's)"})
    dtype: str = field(default="auto", metadata={
        "help": "weights' and activations' dtype (auto: the checkpoint's; bfloat16 for float16 on CPU)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    seed: int = field(default=0, metadata={"help": "seed of the sampler for requests without a seed of their own"})
    chat_template: str | None = field(default=None, metadata={
        "help": "a Jinja chat template overriding the model's (on the command line: a file holding it)"})
    attention_backend: str = field(default="auto", metadata={
        "help": "attention over the paged KV cache: cpu_paged (compiled C++, CPU only), torch_paged (any device) "
                "or auto (cpu_paged where it runs)"})
    threads: int | None = field(default=None, metadata={
        "help": "CPU compute threads (none: torch's default for the machine, one fewer while other processes "
                "keep a core busy, as the scheduler's run-queue wait shows, and back when they leave)"})
    batch_invariant: bool = field(default=True, metadata={
        "help": "bf16 on CPU: each request's tokens and logprobs independent of the batch it runs in (its neighbours, "
                "prompt chunks, prefix-cache hits, speculative verification): one summation order per product and one "
                "attention kernel for every row (int8/int4 weights on AVX512-VNNI CPUs and LoRA adapters on AVX512-BF16 "
                "ones too; not fp32); "
                "--no-batch-invariant trades that for speed"})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "split the model's heads, MLP channels and vocabulary over N ranks, one process each (the engine "
                "process is rank 0; gloo on CPU with the cores split between the ranks, NCCL on CUDA)"})
    distributed_executor: str = field(default="mp", metadata={
        "help": "where tensor-parallel workers run: mp (processes on this machine) or ray (actors on the Ray cluster "
                "this process connects to: RAY_ADDRESS, or a local one)"})
    speculative: dict | None = field(default=None, metadata={
        "help": 'speculative decoding, as JSON: {"method": "ngram", "num_tokens": K, "max_ngram": N} or '
                '{"method": "draft", "model": DIR, "num_tokens": K}'})
    # Weight-only quantization at load time: None | "int8" (per channel) | "int4" (per group).
    # GPTQ/AWQ checkpoints are recognised from their config.json and need none of this.
    quantization: str | None = field(default=None, metadata={
        "help": "weight-only quantization at load time: int8 (per channel) or int4 (per group); "
                "GPTQ/AWQ checkpoints need none"})
    quantization_group_size: int = field(default=64, metadata={"help": "int4: input channels per scale"})
    quantize_lm_head: bool = field(default=True, metadata={"help": "quantize the LM head too"})
    quantize_embeddings: bool = field(default=True, metadata={"help": "quantize the embedding table too (int8)"})
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        _check(self.dtype in DTYPE_CHOICES, "dtype", self.dtype, f"one of {DTYPE_CHOICES}")
        _check(self.threads is None or (isinstance(self.threads, int) and 1 <= self.threads <= 1024), "threads",
               self.threads, "none or an integer in [1, 1024]")
        _check(isinstance(self.tensor_parallel_size, int) and 1 <= self.tensor_parallel_size <= 64,
               "tensor_parallel_size", self.tensor_parallel_size, "an integer in [1, 64]")
        _check(self.distributed_executor in ("mp", "ray"), "distributed_executor", self.distributed_executor,
               "mp or ray")
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
        for sub_name, sub_cls in (("cache", CacheConfig), ("scheduler", SchedulerConfig), ("lora", LoRAConfig)):
            names = {f.name for f in fields(sub_cls)}
            parts[sub_name] = sub_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        top = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - top)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=str(model), **kwargs, **parts)
