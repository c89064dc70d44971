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

from ember.engine.config import SpeculativeConfig  # noqa: F401  (re-exported)
from ember.engine.request import Request



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
    from ember.engine.sampler import sampling_probs

    params = request.params
    if params.greedy:
        target = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == target[accepted]:
            accepted += 1
        return Verified(drafts[:accepted] + [target[accepted]], accepted)

    probs = sampling_probs(logits, [params] * logits.shape[0])
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
