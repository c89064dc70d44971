"""Sampling parameters, the engine's per-request state, and the outputs it returns.

Plain Python (no torch), so the scheduler and KV manager are testable directly.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import math

MAX_LOGPROBS = 20
# Per-request bounds: one request may not take the whole server (each is checked before the
# request reaches the shared engine step).
MAX_N = 128  # sequences per request
MAX_STOP = 64  # stop strings ...
MAX_STOP_CHARS = 1024  # ... each at most this long
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


def _invalid(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{name}: {value!r} is invalid ({why})")


@dataclass(frozen=True)
class StructuredOutput:
    json_schema: dict | str | None = None
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF (GBNF-style), rule `root`

    def __post_init__(self):
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)):
                raise ValueError(f"structured.choice: {self.choice!r:.80} must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json_schema", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured: exactly one of json_schema, json_object, regex, choice, grammar (got {given})")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"structured.choice: {list(self.choice)!r} must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured.{name}: {value!r} must be a non-empty string")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str)):
            raise ValueError(f"structured.json: {self.json_schema!r} must be a JSON schema object")

    def key(self) -> tuple[str, str]:
        if self.json_schema is not None:
            # not sort_keys: the properties are generated in the schema's order (reasoning before answer)
            schema = self.json_schema if isinstance(self.json_schema, str) else json.dumps(self.json_schema)
            return "json_schema", schema
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        return "grammar", self.grammar


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per output token (plus the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # constrain the output to a JSON schema, regex, choice or grammar

    def __post_init__(self):
        if isinstance(self.structured, dict):
            self.structured = StructuredOutput(**self.structured)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        seed_hi = SEED_RANGE[1] - (self.n if integer(self.n) else 1)  # children use seed + i
        checks = [
            ("n", integer(self.n) and 1 <= self.n <= MAX_N, f"must be an integer in [1, {MAX_N}]"),
            ("temperature", number(self.temperature) and self.temperature >= 0, "must be a number >= 0"),
            ("top_p", number(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", integer(self.top_k) and self.top_k >= 0, "must be -1, 0 or a positive integer"),
            ("min_p", number(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", number(self.repetition_penalty) and self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("seed", self.seed is None or (integer(self.seed) and SEED_RANGE[0] <= self.seed <= seed_hi),
             f"must be an integer in [{SEED_RANGE[0]}, {seed_hi}]"),
            ("max_tokens", self.max_tokens is None or (integer(self.max_tokens) and self.max_tokens >= 1), "must be an integer >= 1"),
            ("min_tokens", integer(self.min_tokens) and self.min_tokens >= 0, "must be an integer >= 0"),
            ("logprobs", self.logprobs is None or (integer(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS), f"must be in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or (integer(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS), f"must be in [0, {MAX_LOGPROBS}]"),
            ("stop", len(self.stop) <= MAX_STOP, f"at most {MAX_STOP} stop strings"),
            ("stop", all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
             f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} characters"),
            ("stop_token_ids", len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, f"at most {MAX_STOP_TOKEN_IDS} ids"),
            ("stop_token_ids", all(integer(t) and t >= 0 for t in self.stop_token_ids), "must be token ids >= 0"),
            ("logit_bias", len(self.logit_bias or {}) <= MAX_LOGIT_BIAS, f"at most {MAX_LOGIT_BIAS} entries"),
        ]
        for name, ok, why in checks:
            if not ok:
                value = getattr(self, name)
                if isinstance(value, (list, dict)) and len(value) > 8:
                    value = f"{len(value)} entries"
                raise _invalid(name, value, why)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _invalid("min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        for token, bias in (self.logit_bias or {}).items():
            if not integer(token) or token < 0 or not number(bias) or not -100 <= bias <= 100:
                raise _invalid("logit_bias", {token: bias}, "keys must be token ids, values in [-100, 100]")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names must exist in the model's vocabulary."""
        for name, ids in (("logit_bias", list(self.logit_bias or ())), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise _invalid(name, bad[:5], f"token ids must be < the vocabulary size {vocab_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


# One entry per token: {token_id: Logprob} for the chosen token and the top-k.
TokenLogprobs = dict[int, Logprob]


class SequenceId(NamedTuple):
    """One sequence in the engine: sequence `index` of the user's request `request_id`
    (a request with n > 1 has n of them). The scheduler, runner and proposers key by it."""

    request_id: str
    index: int = 0

    def __str__(self) -> str:
        return f"{self.request_id}[{self.index}]"


class Request:
    """One sequence in the engine. `n > 1` requests become n of these."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        eos_token_ids: tuple[int, ...] = (),
        priority: int = 0,
        arrival_time: float | None = None,
        seed: int | None = None,
        index: int = 0,
    ):
        self.request_id = request_id
        self.index = index
        self.seq_id = SequenceId(request_id, index)
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.max_tokens = max_tokens  # resolved against the context length
        self.eos_token_ids = () if params.ignore_eos else tuple(eos_token_ids)
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.seed = seed
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0  # leading blocks entered in the prefix cache
        self.cache_salt = b""  # extra key for block hashes (e.g. an adapter id)
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.spec_token_ids: list[int] = []  # draft tokens to verify in the next step
        self.num_draft_computed = 0  # positions whose KV the draft model holds (method "draft")
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.lora = None  # the LoRARequest whose adapter this sequence runs with (None: the base model)
        self.lora_adapter = None  # that adapter's weights, read when the request was made
        self.matcher = None  # xgrammar GrammarMatcher of a structured request
        self.allowed_bitmask = None  # xgrammar bitmask row ANDed into its grammar mask (None: no extra ban)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens past a stop found mid-way through a multi-token step."""
        extra = self.num_output_tokens - num_output_tokens
        if extra > 0:
            del self.output_token_ids[num_output_tokens:]
            del self.all_token_ids[len(self.all_token_ids) - extra:]

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, computed={self.num_computed_tokens}/"
            f"{self.num_tokens}, blocks={len(self.block_ids)})"
        )


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    weight_version: int = 0  # which pushed weights produced it (RL: see LLMEngine.update_weights)
