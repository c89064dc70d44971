"""Continuous batching: one scheduling rule for prefill, chunked prefill and decode.

Each step hands out a token budget. Running requests go first (a decode needs one
token, a partly prefilled prompt its next chunk); then waiting requests are
admitted while the budget, `max_num_seqs` and the KV pool allow. Each request's
`num_computed_tokens` catches up with its `num_tokens`; a request samples when
they meet. When the pool runs dry the scheduler preempts (frees the victim's
blocks; it recomputes later, mostly from the prefix cache).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from ember.engine.config import SchedulerConfig
from ember.engine.kv_cache import KVCacheManager
from ember.engine.output import check_token_stop
from ember.engine.request import Request, RequestStatus, SequenceId


class WaitingQueue:
    """FCFS: arrival order, preempted requests back at the front.
    Priority: lowest `priority` value first, then earliest arrival."""

    def __init__(self, policy: str):
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def push(self, request: Request, front: bool = False) -> None:
        if self.policy == "priority":
            heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._counter), request))
        elif front:
            self._fifo.appendleft(request)
        else:
            self._fifo.append(request)

    def peek(self) -> Request:
        return self._heap[0][3] if self.policy == "priority" else self._fifo[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self.policy == "priority" else self._fifo.popleft()

    def remove(self, request: Request) -> None:
        if self.policy == "priority":
            self._heap = [e for e in self._heap if e[3] is not request]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(request)

    def __len__(self) -> int:
        return len(self._heap) if self.policy == "priority" else len(self._fifo)

    def __iter__(self):
        return (e[3] for e in self._heap) if self.policy == "priority" else iter(self._fifo)


@dataclass
class SchedulerOutput:
    # (request, tokens to compute this step), in batch order.
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 max_loras: int | None = None):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.max_loras = max_loras  # distinct LoRA adapters the running requests may use at once
        self.waiting = WaitingQueue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[SequenceId, Request] = {}
        self.num_preemptions = 0

    # ---- admission ------------------------------------------------------------------
    def check_fits(self, request: Request) -> None:
        """Reject at admission what could never run, rather than let it cycle through preemptions."""
        longest = min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)
        if self.kv.blocks_for(longest) > self.kv.num_usable_blocks:
            raise ValueError(
                f"prompt + max_tokens: {longest} tokens can never fit in the KV cache "
                f"({self.kv.num_usable_blocks * self.kv.block_size} tokens); lower max_tokens or raise kv_cache_gib"
            )

    def add_request(self, request: Request) -> None:
        if request.seq_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        self.check_fits(request)
        self.requests[request.seq_id] = request
        self.waiting.push(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[Request, int] = {}
        preempted: list[Request] = []

        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens + len(request.spec_token_ids) - request.num_computed_tokens, budget)
            # Drafts that do not fit the budget are dropped, not split.
            del request.spec_token_ids[max(0, num_new - (request.num_tokens - request.num_computed_tokens)):]
            # (a draft model's lookahead slots were allocated when it proposed)
            while not self.kv.allocate_slots(request, num_new):
                victim = self._pick_victim()
                budget += scheduled.pop(victim, 0)
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled[request] = num_new
                budget -= num_new

        # Admit new work only when nothing had to be preempted this step.
        adapters = {r.lora.lora_int_id for r in self.running if r.lora is not None}
        held_back: list[Request] = []  # waiting for an adapter slot; they keep their place
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if self._needs_another_adapter(request, adapters):
                held_back.append(self.waiting.pop())
                continue
            computed_blocks = self.kv.get_computed_blocks(request)
            num_cached = len(computed_blocks) * self.kv.block_size
            num_new = request.num_tokens - num_cached
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.pop()
            self.kv.record_query(request, num_cached)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            self.running.append(request)
            scheduled[request] = num_new
            budget -= num_new
            if request.lora is not None:
                adapters.add(request.lora.lora_int_id)
        for request in reversed(held_back):
            self.waiting.push(request, front=True)

        # Advanced only now, so a request preempted above frees exactly what was computed.
        for request, num_new in scheduled.items():
            request.num_computed_tokens += num_new
        return SchedulerOutput(list(scheduled.items()), preempted)

    def _needs_another_adapter(self, request: Request, adapters: set[int]) -> bool:
        return (self.max_loras is not None and request.lora is not None
                and request.lora.lora_int_id not in adapters and len(adapters) >= self.max_loras)

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]  # the most recently admitted

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_draft_computed = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push(request, front=True)

    # ---- results ----------------------------------------------------------------------
    def update_from_output(self, output: SchedulerOutput, sampled: dict[SequenceId, list[int]]) -> list[Request]:
        """Append each request's new tokens (several when drafts were accepted), apply
        token-level stops; returns the requests that grew."""
        updated = []
        for request, _ in output.scheduled:
            tokens = sampled.get(request.seq_id)
            if not tokens or request.is_finished:
                continue
            had_drafts = bool(request.spec_token_ids)
            request.spec_token_ids = []
            for token in tokens:
                request.append_output_token(token)
                status = check_token_stop(request, self.max_model_len)
                if status is not None:
                    self.finish_request(request, status)
                    break
            if had_drafts and not request.is_finished:
                # Rejected drafts' slots are rolled back: only the verified tokens count as computed.
                request.num_computed_tokens = request.num_tokens - 1
            updated.append(request)
        return updated

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = status
        del self.requests[request.seq_id]
