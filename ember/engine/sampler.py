"""Sampling, vectorised over the batch.

Order: raw logprobs (what the model said, before any processing, as vLLM reports
them) -> logits processors -> greedy rows take the argmax; the others divide by
temperature, apply top-k/top-p/min-p and draw with the exponential-race trick
(argmax of p / E, E ~ Exp(1)), which equals sampling from p. A seeded request
draws E from its own generator, so its tokens never depend on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.engine.logits import apply_logits_processors
from ember.engine.request import Request, SamplingParams
from ember.models import cpu_ops


@dataclass
class TokenLogprobInfo:
    """Logprob of the chosen token and the top-k alternatives for one position."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobInfo | None]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask all but each row's top-k tokens and smallest nucleus of mass >= top-p."""
    sorted_logits, order = logits.sort(dim=-1)
    vocab = logits.shape[1]
    if top_k is not None:  # 0 = no limit
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def compute_logprob_info(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[TokenLogprobInfo]:
    """Per row: the given token's logprob and rank, and the row's top `num_top[i]` tokens."""
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=1) + 1
    k = max(num_top)
    top_vals, top_ids = logprobs.topk(k, dim=1) if k else (logprobs[:, :0], token_ids[:, None][:, :0])
    rows = zip(token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_vals.tolist(), num_top)
    return [TokenLogprobInfo(t, lp, r, ids[:n], vals[:n]) for t, lp, r, ids, vals, n in rows]


def _plain_greedy(request: Request) -> bool:
    p = request.params
    return (p.greedy and p.logprobs is None and not p.needs_penalties and not p.logit_bias
            and request.num_output_tokens >= p.min_tokens and request.matcher is None)


_batch_matcher = None
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_grammar_masks(logits: torch.Tensor, requests: list[Request]) -> None:
    """Structured requests: forbid every token their grammar does not allow next (the bitmasks
    of all rows are filled in one batched call, on xgrammar's threads)."""
    global _batch_matcher
    rows = [i for i, r in enumerate(requests) if r.matcher is not None and not r.matcher.is_terminated()]
    if not rows:
        return
    import xgrammar as xgr

    if _batch_matcher is None:
        _batch_matcher = xgr.BatchGrammarMatcher(max_threads=2)
    vocab = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(len(requests), vocab)
    _batch_matcher.batch_fill_next_token_bitmask([requests[i].matcher for i in rows], bitmask, indices=rows)
    for i in rows:  # tokens a JSON output may never use, folded into the same bitmask
        if requests[i].allowed_bitmask is not None:
            bitmask[i] &= requests[i].allowed_bitmask
    # Unpack the bits with tensor ops (faster than xgrammar's CPU kernel: BENCHMARKS.md, structured output).
    index = torch.tensor(rows, device=logits.device)
    words = bitmask.to(logits.device).index_select(0, index)
    allowed = ((words.unsqueeze(-1) >> _BIT_SHIFTS.to(logits.device)) & 1).bool().flatten(1)[:, :vocab]
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,  # [rows, vocab], the model's dtype
        requests: list[Request],
        generators: list[torch.Generator | None],
    ) -> SamplerOutput:
        if all(_plain_greedy(r) for r in requests):
            token_ids = cpu_ops.argmax(logits)
            if token_ids is None:
                token_ids = logits.float().argmax(dim=-1)  # (torch's bf16 argmax is the slower path)
            return SamplerOutput(token_ids.tolist(), [None] * len(requests))
        logits = logits.float()
        want_logprobs = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        raw_logprobs = logits[want_logprobs].log_softmax(dim=-1) if want_logprobs else None

        apply_logits_processors(logits, requests)
        apply_grammar_masks(logits, requests)
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if random_rows:
            sampled = self._sample(logits[random_rows], [requests[i] for i in random_rows], [generators[i] for i in random_rows])
            token_ids[random_rows] = sampled

        infos: list[TokenLogprobInfo | None] = [None] * len(requests)
        if want_logprobs:
            rows = compute_logprob_info(
                raw_logprobs, token_ids[want_logprobs], [requests[i].params.logprobs for i in want_logprobs]
            )
            for i, info in zip(want_logprobs, rows):
                infos[i] = info
        return SamplerOutput(token_ids.tolist(), infos)

    def _sample(self, logits: torch.Tensor, requests: list[Request], generators: list[torch.Generator | None]) -> torch.Tensor:
        probs = sampling_probs(logits, [r.params for r in requests])
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, generator in enumerate(generators):
            if generator is not None:
                race[i].exponential_(generator=generator)
        return (probs / race).argmax(dim=-1)


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution a sampled (non-greedy) row draws from: temperature, then top-k/top-p,
    then min-p, one row of `params` per row of `logits`. The sampler, the speculative
    verifier and the draft model all draw from this, so they agree on what "p" is."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32)
    logits = logits.float() / temperature.unsqueeze(1)
    top_k = top_p = None
    if any(p.top_k > 0 for p in params):
        top_k = torch.tensor([p.top_k for p in params], device=device)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device)
    if top_k is not None or top_p is not None:
        logits = apply_top_k_top_p(logits, top_k, top_p)
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device))
    return logits.softmax(dim=-1)
