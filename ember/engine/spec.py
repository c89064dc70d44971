"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and the rejection sampler.

Each step a request may carry k draft tokens; the target model scores them all in the
same packed forward (the request's query is its last token plus the drafts), and
`verify` accepts the longest prefix the target agrees with, plus one token of its own:
greedy requests keep a draft only if it is the target's argmax; sampled requests use
standard speculative sampling (accept x with min(1, p(x)/q(x)), else draw from the
normalised residual max(p - q, 0)), so accepted tokens follow the target distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ember.engine.request import Request

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_tokens: int = 3  # drafts per step
    max_ngram: int = 3
    min_ngram: int = 1
    model: str | None = None  # the draft model's directory (method "draft")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative.method: {self.method!r} is not one of {METHODS}")
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


def can_speculate(request: Request) -> bool:
    """Requests whose logits processors depend on the tokens so far are not speculated."""
    p = request.params
    return not (p.needs_penalties or p.logit_bias or request.num_output_tokens < p.min_tokens
                or p.prompt_logprobs is not None or getattr(p, "structured", None) is not None)


def ngram_propose(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The continuation of the latest earlier occurrence of the last n tokens (longest n first).

    When that continuation reaches the end of the text, the text is taken to repeat with the
    period the match implies (a loop keeps looping), so short loops still get k drafts."""
    if len(tokens) < min_n + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, len(arr) - 1), min_n - 1, -1):
        suffix = arr[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # starts 0 .. len-n-1
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            period = len(arr) - start
            return [int(arr[start + i % period]) for i in range(k)]
    return []


@dataclass
class Verified:
    tokens: list[int]  # accepted drafts, then the target's own token
    num_accepted: int


def verify(
    logits: torch.Tensor,  # [k + 1, vocab] fp32 target logits, row j scores the token after drafts[:j]
    drafts: list[int],
    request: Request,
    generator: torch.Generator | None,
    default_generator: torch.Generator,
    draft_probs: torch.Tensor | None = None,  # [k, vocab] the draft model's distributions (None: n-gram)
) -> Verified:
    from ember.engine.sampler import apply_min_p, apply_top_k_top_p

    params = request.params
    if params.greedy:
        target = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == target[accepted]:
            accepted += 1
        return Verified(drafts[:accepted] + [target[accepted]], accepted)

    scaled = logits / params.temperature
    if params.top_k > 0 or params.top_p < 1.0:
        rows = scaled.shape[0]
        top_k = torch.full((rows,), params.top_k, device=logits.device) if params.top_k > 0 else None
        top_p = torch.full((rows,), params.top_p, device=logits.device) if params.top_p < 1.0 else None
        scaled = apply_top_k_top_p(scaled, top_k, top_p)
    if params.min_p > 0:
        scaled = apply_min_p(scaled, torch.full((scaled.shape[0],), params.min_p, device=logits.device))
    probs = scaled.softmax(dim=-1)
    gen = generator or default_generator
    uniforms = torch.rand(len(drafts) + 1, generator=gen, device=gen.device).tolist()
    for j, token in enumerate(drafts):
        p = probs[j, token].item()
        q = 1.0 if draft_probs is None else draft_probs[j, token].item()
        if q > 0 and uniforms[j] < min(1.0, p / q):
            continue
        residual = probs[j].clone()
        if draft_probs is None:
            residual[token] = 0.0
        else:
            residual = (residual - draft_probs[j]).clamp_(min=0.0)
        if residual.sum() <= 0:  # p == q: any token of p is a valid replacement
            residual = probs[j]
        replacement = torch.multinomial(residual / residual.sum(), 1, generator=gen).item()
        return Verified(drafts[:j] + [replacement], j)
    bonus = torch.multinomial(probs[len(drafts)], 1, generator=gen).item()
    return Verified(list(drafts) + [bonus], len(drafts))
