"""LLMEngine: schedule -> run -> sample -> update, one step at a time; and the offline `LLM`."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence as Seq
from typing import Any

import torch
from tqdm.auto import tqdm

from ember.engine.config import EngineConfig, SchedulerConfig
from ember.engine.cpu_share import DEFAULT_THREADS, ThreadGovernor
from ember.engine.kv_cache import KVCacheManager
from ember.engine.output import OutputProcessor, RequestGroup, Sequence
from ember.engine.request import Request, RequestOutput, RequestStatus, SamplingParams
from ember.engine.runner import ModelRunner, kv_bytes_per_block
from ember.engine.scheduler import Scheduler
from ember.engine.spec import SpeculativeConfig, can_speculate, ngram_propose
from ember.engine.tensor_parallel import TensorParallelWorkers, rank_threads
from ember.models import load_model
from ember.models.huge_pages import rehome_weights
from ember.models.quant import QuantizedLinear, quantize_model, weight_bytes
from ember.models.config import ModelConfig
from ember.models.tensor_parallel import check_shardable, load_model_shard, shard_hf_tensors
from ember.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


def _available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def _warm_cpu_kernels() -> None:
    """Compile or load the C++ kernels now, not inside the first request; say which are missing."""
    from ember.models import cpu_ops

    found = {"int (AVX512-VNNI)": cpu_ops.int_kernels_available(), "bf16 (AVX512-BF16)": cpu_ops.gemv_available()}
    if not found["bf16 (AVX512-BF16)"]:
        found["bf16 products (AVX2)"] = cpu_ops.blocks_available()
    if not all(found.values()):
        logger.info("CPU kernels: %s; the rest runs on PyTorch's ops", ", ".join(
            f"{name} {'yes' if ok else 'no'}" for name, ok in found.items()))


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.governor = None
        self.tp_workers = None
        self._threads = config.threads if self.device.type == "cpu" else None  # fixed: --threads or TP's share
        if self.device.type == "cpu":
            _warm_cpu_kernels()
        if config.tensor_parallel_size > 1:  # the workers load their shards while this process loads its own
            check_shardable(ModelConfig.from_path(config.model), config.tensor_parallel_size)
            threads = rank_threads(config.tensor_parallel_size, config.threads)
            torch.set_num_threads(threads)
            self._threads = threads if self.device.type == "cpu" else None
            self.tp_workers = TensorParallelWorkers(config, config.tensor_parallel_size, self.device, threads,
                                                    config.distributed_executor)
        elif self.device.type == "cpu":
            if config.threads is not None:
                torch.set_num_threads(config.threads)
            else:
                self.governor = ThreadGovernor(DEFAULT_THREADS)
        try:
            self._build(config)
        except BaseException:
            if self.tp_workers is not None:
                self.tp_workers.shutdown()
            raise

    def _build(self, config: EngineConfig) -> None:
        # The KV cache and attention see this rank's heads (all of them without tensor parallelism).
        if self.tp_workers is not None:  # this rank's share only, quantized by itself
            self.model, self.rank_config = load_model_shard(config.model, config.dtype, self.device,
                                                            self.tp_workers.group, config.quant_config())
            self.model_config = self.model.config
        else:
            self.model, self.model_config = load_model(config.model, config.dtype, self.device)
            self.rank_config = self.model_config
            if config.quantization is not None:
                quantize_model(self.model, config.quant_config())
        if self.device.type == "cpu":
            rehome_weights(self.model)
        self.tokenizer = Tokenizer(config.tokenizer or config.model, chat_template=config.chat_template)
        mc = self.model_config
        self.max_model_len = config.scheduler.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len: {self.max_model_len} exceeds the model's max_position_embeddings ({mc.max_position_embeddings})"
            )
        sched = self._scheduler_config()
        cache = config.cache
        dtype = next(self.model.parameters()).dtype
        num_blocks, block_bytes = self._num_kv_blocks(sched, dtype)
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.lora = None
        if config.lora.enable_lora:
            from ember.engine.lora import LoRAManager

            self.lora = LoRAManager(self.model, config.lora, dtype, self.device)
            if self.tp_workers is not None:
                self.lora.replicate = self.tp_workers.write_lora
        self.scheduler = Scheduler(sched, self.kv, self.max_model_len,
                                   config.lora.max_loras if self.lora is not None else None)
        if self.tp_workers is not None:
            self.tp_workers.start(num_blocks)
        self.runner = ModelRunner(self.model, self.rank_config, num_blocks, cache.block_size, self.device, config.seed,
                                  config.attention_backend, cache.kv_cache_dtype, self.lora, config.batch_invariant,
                                  self.tp_workers)
        self.spec = SpeculativeConfig.from_any(config.speculative)
        self.draft = None
        if self.spec is not None and self.spec.method == "draft":
            from ember.engine.draft import DraftProposer

            self.draft = DraftProposer(self.spec, mc, num_blocks, cache.block_size, self.device, dtype,
                                       config.seed, config.attention_backend, config.batch_invariant)
        self.spec_stats = {"spec_num_drafts": 0, "spec_num_accepted": 0, "spec_num_verifications": 0}
        self._log_summary(dtype, num_blocks, block_bytes)
        self._grammars = None
        self._grammars_lock = threading.Lock()  # requests are prepared on worker threads
        self.weight_version = 0
        self.sleeping = False
        self.output = OutputProcessor(self.tokenizer)
        self.num_steps = 0
        self._ids = itertools.count()

    def _scheduler_config(self) -> SchedulerConfig:
        sched = self.config.scheduler
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt (or a preempted request's recompute) must fit one step.
            sched = dataclasses.replace(sched, max_num_batched_tokens=self.max_model_len)
        if sched.max_num_batched_tokens < sched.max_num_seqs:
            sched = dataclasses.replace(sched, max_num_seqs=sched.max_num_batched_tokens)
        return sched

    def _num_kv_blocks(self, sched: SchedulerConfig, dtype: torch.dtype) -> tuple[int, int]:
        """Blocks the budget buys (never more than max_num_seqs full-length requests need), and a block's bytes."""
        cache = self.config.cache
        block_bytes = kv_bytes_per_block(self.rank_config, cache.block_size, dtype, cache.kv_cache_dtype)
        budget = cache.kv_cache_gib * (1 << 30) if cache.kv_cache_gib else min(4 << 30, _available_memory_bytes(self.device) // 4)
        if self.device.type == "cpu":  # the ranks share the machine's memory: each holds its part of the budget
            budget /= self.config.tensor_parallel_size
        enough = sched.max_num_seqs * -(-self.max_model_len // cache.block_size) + 1
        num_blocks = min(int(budget // block_bytes), enough)
        if num_blocks < 2:
            raise ValueError(f"kv_cache_gib: {cache.kv_cache_gib} is too small for one KV block ({block_bytes} bytes)")
        return num_blocks, block_bytes

    def _log_summary(self, dtype: torch.dtype, num_blocks: int, block_bytes: int) -> None:
        config, cache = self.config, self.config.cache
        logger.info(
            "%s on %s (%s, %s attention, weights %.1f MiB%s): KV cache %s %d blocks x %d = %d tokens (%.2f GiB), "
            "max_model_len %d",
            self.model_config.architecture, self.device, str(dtype).removeprefix("torch."),
            self.runner.attention_backend, weight_bytes(self.model) / (1 << 20),
            f", {config.quantization}" if config.quantization else "", cache.kv_cache_dtype,
            num_blocks - 1, cache.block_size, (num_blocks - 1) * cache.block_size,
            num_blocks * block_bytes / (1 << 30), self.max_model_len,
        )

    @classmethod
    def from_args(cls, model: str | None = None, revision: str | None = None, gguf_file: str | None = None,
                  **kwargs) -> "LLMEngine":
        """`model`: a directory, a .gguf file, a model name (see `ember models`), a Hugging Face id
        (`org/name`, `org/name:Q4_K_M`; `revision`, `gguf_file` pick within it) or None for the default."""
        from ember.registry import resolve_model

        if kwargs.get("tokenizer") is not None:
            kwargs["tokenizer"] = resolve_model(kwargs["tokenizer"], revision)
        return cls(EngineConfig.from_kwargs(resolve_model(model, revision, gguf_file), **kwargs))

    # ---- requests -------------------------------------------------------------------
    def process_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Prompt -> (text, token ids), validated; raises ValueError naming the problem."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: '' is empty")
            self.check_prompt_chars(len(prompt))
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt_token_ids: {bad[:5]} are not token ids in [0, {vocab})")
        else:
            raise ValueError(f"prompt: {type(prompt).__name__} is not a string or a list of token ids")
        if not ids:
            raise ValueError("prompt: it has no tokens")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens do not fit the context (max_model_len {self.max_model_len}, "
                "which must also leave room for one generated token)"
            )
        return text, ids

    def check_prompt_chars(self, num_chars: int, field: str = "prompt") -> None:
        """Reject text that cannot fit the context before spending time tokenizing it: no token
        spells more than `tokenizer.max_token_chars` characters."""
        limit = self.max_model_len * self.tokenizer.max_token_chars
        if num_chars > limit:
            raise ValueError(f"{field}: {num_chars} characters cannot fit the context ({self.max_model_len} tokens "
                             f"of at most {self.tokenizer.max_token_chars} characters each)")

    def make_request_group(
        self, request_id: str, prompt: PromptType, params: SamplingParams | None = None, priority: int = 0,
        lora_request=None,
    ) -> RequestGroup:
        """Validate a request and build its sequences, without touching engine state
        (so a server thread can do it and report errors before queueing)."""
        params = params or SamplingParams()  # (validated when it was made)
        text, ids = self.process_prompt(prompt)
        params.check_vocab(self.model_config.vocab_size)
        if lora_request is not None:
            if self.lora is None:
                raise ValueError("lora_request: this engine serves no adapters (start it with enable_lora=True)")
            adapter = self.lora.load(lora_request)  # read and checked now: a bad adapter fails this request only
        compiled = self.compile_structured(params.structured) if params.structured is not None else None
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        eos = tuple(self.tokenizer.eos_token_ids) or self.model_config.eos_token_ids
        sequences = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            request = Request(request_id, ids, params, max_tokens, eos, priority, seed=seed, index=i)
            if lora_request is not None:
                request.lora, request.lora_adapter = lora_request, adapter
                # never another adapter's KV (an id re-bound to another directory included)
                request.cache_salt = f"lora:{lora_request.lora_int_id}:{lora_request.lora_path}".encode()
            if compiled is not None:
                request.matcher = self.grammars.matcher(compiled)
                request.allowed_bitmask = self.grammars.allowed_bitmask(params.structured)
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            sequences.append(Sequence(request, detok))
        self.scheduler.check_fits(sequences[0].request)
        group = RequestGroup(request_id, text, ids, sequences)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        return group

    @property
    def grammars(self):
        """xgrammar's compiler for this tokenizer, built on first use."""
        with self._grammars_lock:
            if self._grammars is None:
                from ember.engine.structured import GrammarCompiler

                self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        return self._grammars

    def compile_structured(self, spec):
        """Compile (or fetch from the cache) a structured-output spec; ValueError if it is invalid.
        Thread-safe: the server compiles off the event loop before submitting."""
        return self.grammars.compile(spec)

    def add_request_group(self, group: RequestGroup) -> None:
        if group.request_id in self.output.groups:
            raise ValueError(f"request_id: {group.request_id!r} is already in use")
        for seq in group.sequences:
            self.scheduler.add_request(seq.request)
        self.output.add(group)

    def add_request(
        self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None, priority: int = 0,
        lora_request=None,
    ) -> str:
        """Validate and queue one request; nothing is queued if it is invalid."""
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.output.groups:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        self.add_request_group(self.make_request_group(request_id, prompt, params, priority, lora_request))
        return request_id

    def abort_request(self, request_id: str) -> None:
        group = self.output.groups.get(request_id)
        if group is None:
            return
        for seq in group.sequences:
            self.scheduler.finish_request(seq.request, RequestStatus.FINISHED_ABORTED)
            self.runner.release(seq.request.seq_id)
        self.output.mark_aborted(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self.output.groups)

    # ---- one step -----------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One scheduling + forward step. Returns an output for every request it advanced (for
        streaming), or with `finished_only` only for those that finished."""
        if self.sleeping:
            raise ValueError("step: the engine is asleep; call wake() first")
        if self.governor is not None:
            self.governor.before_step()
        # this engine's thread count, which another engine in the process (a bench's peer, a draft) may have changed
        threads = self.governor.threads if self.governor is not None else self._threads
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        scheduled = self.scheduler.schedule()
        if not scheduled.is_empty:
            result = self.runner.execute(scheduled)
            self.num_steps += 1
            self._count_speculation(scheduled, result)
            for seq_id, infos in result.prompt_logprobs.items():
                self.output.add_prompt_logprobs(seq_id, infos)
            now = time.monotonic()
            for request in self.scheduler.update_from_output(scheduled, result.sampled):
                if self.output.process_tokens(request, result.logprobs.get(request.seq_id), now):
                    self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
                if request.is_finished:
                    self.runner.release(request.seq_id)
        if self.spec is not None:
            self._propose()
        if self.governor is not None:
            self.governor.after_step()
        return self.output.outputs(finished_only, self.weight_version)

    def _count_speculation(self, scheduled, result) -> None:
        self.spec_stats["spec_num_drafts"] += result.num_proposed
        self.spec_stats["spec_num_accepted"] += result.num_accepted
        self.spec_stats["spec_num_verifications"] += sum(1 for r, _ in scheduled.scheduled if r.spec_token_ids)

    def _propose(self) -> None:
        """Drafts for every decoding request that can speculate, scored in the next step."""
        spec = self.spec
        candidates, counts = [], []
        for request in self.scheduler.running:
            if request.num_computed_tokens != request.num_tokens - 1 or not can_speculate(request):
                continue
            k = min(spec.num_tokens, request.max_tokens - request.num_output_tokens - 1,
                    self.max_model_len - request.num_tokens - 1)
            if k <= 0:
                continue
            if self.draft is None:
                request.spec_token_ids = ngram_propose(request.all_token_ids, k, spec.max_ngram, spec.min_ngram)
                continue
            # the draft's KV of rejected drafts is stale; it writes k - 1 positions ahead
            request.num_draft_computed = min(request.num_draft_computed, request.num_tokens - 1)
            if self.kv.allocate_slots(request, 0, num_lookahead=k):
                candidates.append(request)
                counts.append(k)
        if candidates:
            for seq_id, (drafts, probs) in self.draft.propose(candidates, counts).items():
                self.scheduler.requests[seq_id].spec_token_ids = drafts
                if probs is not None:
                    self.runner.draft_probs[seq_id] = probs

    # ---- RL: weights in, memory out --------------------------------------------------
    def update_weights(self, named_tensors, strict: bool = False) -> int:
        """Copy tensors into the model in place, by HF parameter name (a full state dict, or
        any subset); forget the prefix cache, whose KV the old weights made. Returns the new
        weight version, which every later output carries."""
        from ember.models.loader import load_weights

        if any(isinstance(m, QuantizedLinear) for m in self.model.modules()):
            raise ValueError("update_weights: this engine's weights are quantized; push weights into an engine "
                             "without quantization")
        items = named_tensors.items() if hasattr(named_tensors, "items") else named_tensors
        if self.tp_workers is not None:  # each rank keeps its piece; rank 0's load checks names and shapes first
            items = list(items)
            mine = shard_hf_tensors(self.model, self.tp_workers.group, items)
            loaded = load_weights(self.model, ((n, t, "update_weights") for n, t in mine), strict=strict)
            if loaded:
                self.tp_workers.update_weights(items, strict)
        else:
            loaded = load_weights(self.model, ((n, t, "update_weights") for n, t in items), strict=strict)
        if not loaded:
            raise ValueError("update_weights: no tensor matched a parameter name of the model")
        self.kv.reset_prefix_cache()
        self.weight_version += 1
        return self.weight_version

    def update_lora(self, lora_request, named_tensors) -> int:
        """New weights for a served adapter, by PEFT name (an RL trainer pushing only its adapter);
        forgets the prefix cache and bumps the weight version, as update_weights does."""
        if self.lora is None:
            raise ValueError("update_lora: this engine serves no adapters (start it with enable_lora=True)")
        items = dict(named_tensors.items() if hasattr(named_tensors, "items") else named_tensors)
        self.lora.update(lora_request, items)
        self.kv.reset_prefix_cache()
        self.weight_version += 1
        return self.weight_version

    def sleep(self) -> None:
        """Free the KV cache between rollout phases (requests must have finished)."""
        if self.has_unfinished_requests():
            raise ValueError("sleep: requests are still running; finish or abort them first")
        if not self.sleeping:
            self.runner.release_kv_cache()
            self.kv.reset_prefix_cache()
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            if self.tp_workers is not None:
                self.tp_workers.allocate_kv_cache()
            self.runner.allocate_kv_cache()
            self.sleeping = False

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (the engine serves no step after this)."""
        if self.tp_workers is not None:
            self.tp_workers.shutdown()

    # ---- introspection ------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        kv = self.kv
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": kv.usage,
            "num_blocks": kv.num_usable_blocks,
            "num_free_blocks": kv.num_free_blocks,
            "block_size": kv.block_size,
            "prefix_cache_queries": kv.num_queried_tokens,
            "prefix_cache_hits": kv.num_hit_tokens,
            "prefix_cache_hit_rate": kv.hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens": self.output.num_prompt_tokens,
            "generation_tokens": self.output.num_generation_tokens,
            "num_steps": self.num_steps,
            **(self._spec_summary() if self.spec is not None else {}),
        }

    def _spec_summary(self) -> dict[str, float]:
        s = self.spec_stats
        return {**s, "spec_acceptance_rate": s["spec_num_accepted"] / max(1, s["spec_num_drafts"]),
                "spec_mean_accepted_length": 1 + s["spec_num_accepted"] / max(1, s["spec_num_verifications"])}


class LLM:
    """Offline batched generation: `LLM(model_dir).generate(prompts, params)`."""

    def __init__(self, model: str | None = None, revision: str | None = None, gguf_file: str | None = None,
                 **kwargs: Any):
        from ember.models.config import ModelConfig
        from ember.registry import resolve_model

        path = resolve_model(model, revision, gguf_file)
        self.embedder = None
        if ModelConfig.from_path(path).architecture == "BertModel":  # an encoder: embeddings only
            from ember.engine.embed import EmbeddingEngine

            self.embedder = EmbeddingEngine(path, **kwargs)
            self.engine = None
        else:
            self.engine = LLMEngine.from_args(path, **kwargs)
        self._ids = itertools.count()

    def embed(self, texts: str | list[str] | list[list[int]]) -> list[list[float]]:
        """Sentence embeddings (pooled and normalised as the model directory says)."""
        if self.embedder is None:
            raise ValueError("model: this is a generative model; embed() needs an embedding model (e.g. BERT)")
        # offline, as sentence-transformers: long texts are cut to what the model takes
        vectors, _ = self.embedder.embed([texts] if isinstance(texts, str) else list(texts), truncate=-1)
        return vectors.tolist()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def update_weights(self, named_tensors, strict: bool = False) -> int:
        return self.engine.update_weights(named_tensors, strict)

    def update_lora(self, lora_request, named_tensors) -> int:
        return self.engine.update_lora(lora_request, named_tensors)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Seq[int] | None = None,
        lora_request=None,
    ) -> list[RequestOutput]:
        """`lora_request`: a LoRARequest for every prompt, or a list of one (or None) per prompt."""
        if self.engine is None:
            raise ValueError("model: this is an embedding model; use embed(), not generate()")
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts, list) and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, Seq) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"lora_request: {len(loras)} given for {len(prompts)} prompts")
        # Every request is tokenized and validated before any is queued: one bad prompt adds no work.
        groups = [self.engine.make_request_group(f"llm-{next(self._ids)}", prompt, p, prio, lora)
                  for prompt, p, prio, lora in zip(prompts, params, priorities, loras)]
        for group in groups:
            self.engine.add_request_group(group)
        return self._run([g.request_id for g in groups], use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm or len(ids) < 2)
        start, num_out = time.perf_counter(), 0
        try:
            while len(finished) < len(ids):
                for output in self.engine.step(finished_only=True):
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        num_out += sum(len(o.token_ids) for o in output.outputs)
                        bar.update(1)
                        bar.set_postfix(out_tok_s=f"{num_out / (time.perf_counter() - start):.0f}")
        finally:
            bar.close()
        return [finished[i] for i in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.engine.tokenizer
        prompts = [
            tokenizer.encode_chat(conv, add_generation_prompt=add_generation_prompt, **template_kwargs)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)
