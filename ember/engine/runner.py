"""Model runner: owns the KV tensors, turns a SchedulerOutput into one flat forward,
and samples the rows that need a token."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ember.engine.attention import BatchLayout, KVLayout, choose_layout, make_backend, resolve_backend
from ember.engine.attention.torch_paged import LayerCache
from ember.engine.kv_cache import NULL_BLOCK
from ember.engine.request import Request, SequenceId
from ember.engine.sampler import Sampler, TokenLogprobInfo, compute_logprob_info
from ember.engine.scheduler import SchedulerOutput
from ember.engine.spec import verify
from ember.models import cpu_ops
from ember.models.config import ModelConfig


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    layout = KVLayout(quantized=kv_cache_dtype == "int8", dtype=dtype)
    return config.num_layers * block_size * config.num_kv_heads * layout.bytes_per_token_head(config.head_dim)


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                       layout: KVLayout) -> list[LayerCache]:
    caches = layout.allocate(config.num_layers, num_blocks, config.num_kv_heads, block_size, config.head_dim, device)
    for cache in caches:  # padding in gathers points at the null block: it must hold finite values
        cache[0][NULL_BLOCK].zero_()
        cache[1][NULL_BLOCK].zero_()
    return caches


@dataclass
class RunnerOutput:
    sampled: dict[SequenceId, list[int]] = field(default_factory=dict)  # one token, or accepted drafts + one
    logprobs: dict[SequenceId, list[TokenLogprobInfo]] = field(default_factory=dict)
    num_proposed: int = 0  # draft tokens scored this step
    num_accepted: int = 0
    # prompt logprobs of the prompt positions computed this step
    prompt_logprobs: dict[SequenceId, list[TokenLogprobInfo]] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        seed: int,
        attention_backend: str = "auto",
        kv_cache_dtype: str = "auto",
        lora=None,  # the engine's LoRAManager when it serves adapters
        batch_invariant: bool = False,
        workers=None,  # tensor parallel: the other ranks (ember.engine.tensor_parallel.TensorParallelWorkers)
    ):
        self.lora = lora
        self.workers = workers
        self.model = model
        self.config = config
        self.device = device
        self.block_size = block_size
        self.dtype = next(model.parameters()).dtype
        self.attention_backend = resolve_backend(
            attention_backend, device, (config.num_heads, config.num_kv_heads, config.head_dim, block_size)
        )
        self.batch_invariant = batch_invariant
        plain = config.attn_softcap is None and not config.family.sinks
        self.kv_layout = choose_layout(self.attention_backend, self.dtype, kv_cache_dtype, batch_invariant, plain)
        self.num_blocks = num_blocks
        self.kv_caches: list[LayerCache] = []
        self.allocate_kv_cache()
        self.sampler = Sampler(device, seed)
        self.generators: dict[SequenceId, torch.Generator] = {}
        self.draft_probs: dict[SequenceId, torch.Tensor] = {}  # a draft model's distributions, for sampled requests

    def allocate_kv_cache(self) -> None:
        self.kv_caches = allocate_kv_caches(self.config, self.num_blocks, self.block_size, self.device, self.kv_layout)
        self.backend = make_backend(self.attention_backend, self.kv_caches, self.block_size, self.kv_layout,
                                    self.batch_invariant)

    def release_kv_cache(self) -> None:
        """Drop every reference to the KV buffer so its memory goes back to the allocator."""
        if self.workers is not None:
            self.workers.release_kv_cache()
        self.kv_caches = []
        self.backend = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generator(self, request: Request) -> torch.Generator | None:
        if request.seed is None:
            return None
        generator = self.generators.get(request.seq_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
            self.generators[request.seq_id] = generator
        return generator

    def release(self, seq_id: SequenceId) -> None:
        self.generators.pop(seq_id, None)
        self.draft_probs.pop(seq_id, None)

    def routing(self):
        """cpu_ops' product routing for this engine (batch-invariant or not) for the length of a step."""
        return cpu_ops.batch_invariance(self.batch_invariant) if self.device.type == "cpu" else contextlib.nullcontext()

    def forward(self, requests: list[Request], query_lens: list[int], context_lens: list[int],
                input_ids: list[int], output_rows: list[int] | None = None) -> torch.Tensor:
        """One flat forward: request i's `query_lens[i]` tokens at positions after its
        `context_lens[i]` cached ones (requests ordered by query length). Returns hidden rows: every
        row's, or those of `output_rows` (ascending) alone if the model takes them (see
        AttentionContext.output_rows; callers tell the two apart by the row count)."""
        with self.routing():
            return self._forward(requests, query_lens, context_lens, input_ids, output_rows)

    @torch.inference_mode()
    def _forward(self, requests: list[Request], query_lens: list[int], context_lens: list[int],
                 input_ids: list[int], output_rows: list[int] | None = None) -> torch.Tensor:
        device = self.device
        bs = self.block_size
        max_blocks = max(len(r.block_ids) for r in requests)
        # (through numpy: torch.tensor on a list of lists took ~3x as long, ~120 us for 64 requests' tables)
        block_tables = torch.from_numpy(np.array(
            [r.block_ids + [NULL_BLOCK] * (max_blocks - len(r.block_ids)) for r in requests], dtype=np.int64,
        )).to(device)
        if len(input_ids) == len(requests):  # decodes only (the common step): a few list lookups
            positions = torch.tensor(context_lens, device=device)
            slot_mapping = torch.tensor([r.block_ids[p // bs] * bs + p % bs for r, p in zip(requests, context_lens)],
                                        device=device)
        else:
            lens = torch.tensor(query_lens, device=device)
            starts = torch.tensor(context_lens, device=device)
            token_request = torch.repeat_interleave(torch.arange(len(requests), device=device), lens)
            first_token = torch.cumsum(lens, 0) - lens
            positions = torch.arange(len(input_ids), device=device) + (starts - first_token)[token_request]
            slot_mapping = block_tables[token_request, positions // bs] * bs + positions % bs
        # LoRA's per-adapter row slices cover the whole batch in every layer: no pruned last layer there
        if output_rows is not None and (len(output_rows) == len(input_ids) or self.lora is not None):
            output_rows = None
        keep = None if output_rows is None else torch.tensor(output_rows, dtype=torch.int64, device=device)
        layout = BatchLayout(query_lens, context_lens, block_tables, slot_mapping, positions, keep)
        ids = torch.tensor(input_ids, device=device)
        if self.workers is not None:  # tensor parallel: the other ranks run the same forward on their shards
            groups = self.lora.step_groups if self.lora is not None else ()
            return self.workers.forward(ids, layout, lambda: self.run_model(ids, layout), groups)
        return self.run_model(ids, layout)

    def run_model(self, input_ids: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """The model over one step's flat tokens (a tensor-parallel worker's whole share of a step)."""
        return self.model(input_ids, layout.positions, self.backend.build(layout))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.workers is not None:  # vocabulary-parallel: every rank computes its slice
            return self.workers.compute_logits(hidden, lambda: self.model.compute_logits(hidden))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        with self.routing():  # the forward, the LM head, verification and prompt logprobs alike
            return self._execute(scheduled)

    def _execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        # Shortest queries first: decodes lead, so attention backends batch them (and, serving LoRA,
        # requests of one adapter and query length (its decodes) follow one another: one slice of the batch).
        items = sorted(scheduled.scheduled, key=lambda item: (item[1], item[0].lora.lora_int_id if item[0].lora else 0))
        requests = [r for r, _ in items]
        query_lens = [n for _, n in items]
        # num_computed_tokens already includes this step's tokens.
        context_lens = [r.num_computed_tokens - n for r, n in items]
        input_ids: list[int] = []
        for request, n, start in zip(requests, query_lens, context_lens):
            tokens = request.all_token_ids + request.spec_token_ids if request.spec_token_ids else request.all_token_ids
            input_ids.extend(tokens[start:start + n])

        ends = list(itertools.accumulate(query_lens))
        done = [i for i, r in enumerate(requests) if r.num_computed_tokens == r.num_tokens + len(r.spec_token_ids)]
        plain = [i for i in done if not requests[i].spec_token_ids]
        # The rows this step reads back: each sampled row, each verification's rows, prompt logprobs' rows.
        # The model may compute its last layer for these alone (one row if none: no empty products).
        # A decode-only step reads back every row: nothing to collect.
        output_rows = None
        if len(plain) != len(input_ids):
            used = {ends[i] - 1 for i in plain}
            for i in done:
                used.update(range(ends[i] - len(requests[i].spec_token_ids) - 1, ends[i]))
            for i, request in enumerate(requests):
                if request.params.prompt_logprobs is not None:
                    used.update(range(ends[i] - query_lens[i], ends[i]))
            output_rows = sorted(used) or [ends[-1] - 1]
        if self.lora is None:
            hidden = self.forward(requests, query_lens, context_lens, input_ids, output_rows)
        else:
            self.lora.prepare_step(requests, query_lens)
            try:
                hidden = self.forward(requests, query_lens, context_lens, input_ids)
            finally:
                self.lora.clear_step()  # a later forward (a test's, the draft's) sees no stale rows
        if hidden.shape[0] != ends[-1]:  # the output rows' alone: row r of the batch is hidden[where[r]]
            where = {row: j for j, row in enumerate(output_rows)}
            start_of = where.__getitem__
        else:
            start_of = int
        out = RunnerOutput()
        if plain:
            rows = [start_of(ends[i] - 1) for i in plain]  # ascending and distinct: if one per row, every row
            sampled = hidden if len(rows) == hidden.shape[0] else hidden[torch.tensor(rows, device=self.device)]
            logits = self.compute_logits(sampled)
            sample_reqs = [requests[i] for i in plain]
            result = self.sampler(logits, sample_reqs, [self._generator(r) for r in sample_reqs])
            for request, token, info in zip(sample_reqs, result.token_ids, result.logprobs):
                out.sampled[request.seq_id] = [token]
                if info is not None:
                    out.logprobs[request.seq_id] = [info]
        for i in done:
            if requests[i].spec_token_ids:
                first = start_of(ends[i] - len(requests[i].spec_token_ids) - 1)
                self._verify(requests[i], hidden[first:first + len(requests[i].spec_token_ids) + 1], out)
        for i, request in enumerate(requests):
            if request.params.prompt_logprobs is not None:
                first = start_of(ends[i] - query_lens[i])
                self._prompt_logprobs(request, hidden[first:first + query_lens[i]], context_lens[i], out)
        return out

    def _verify(self, request: Request, hidden: torch.Tensor, out: RunnerOutput) -> None:
        """Rows of the last token and each draft -> the accepted tokens plus one of the target's."""
        logits = self.compute_logits(hidden).float()
        drafts = request.spec_token_ids
        draft_probs = self.draft_probs.pop(request.seq_id, None)
        verified = verify(logits, drafts, request, self._generator(request), self.sampler.generator, draft_probs)
        out.sampled[request.seq_id] = verified.tokens
        out.num_proposed += len(drafts)
        out.num_accepted += verified.num_accepted
        if request.params.logprobs is not None:
            n = len(verified.tokens)
            raw = logits[:n].log_softmax(dim=-1)
            out.logprobs[request.seq_id] = compute_logprob_info(
                raw, torch.tensor(verified.tokens, device=raw.device), [request.params.logprobs] * n
            )

    def _prompt_logprobs(self, request: Request, hidden: torch.Tensor, start: int, out: RunnerOutput) -> None:
        # Row j predicts the token at position start + j + 1, if that is a prompt token.
        num = min(hidden.shape[0], request.num_prompt_tokens - 1 - start)
        if num <= 0:
            return
        logprobs = self.compute_logits(hidden[:num]).float().log_softmax(dim=-1)
        targets = torch.tensor(request.prompt_token_ids[start + 1:start + 1 + num], device=self.device)
        out.prompt_logprobs[request.seq_id] = compute_logprob_info(
            logprobs, targets, [request.params.prompt_logprobs] * num
        )
