"""Per-request logits processors, vectorised over the rows that use them.

Definitions follow vLLM / the OpenAI API:
- repetition_penalty (over prompt and output tokens): positive logits / p, negative * p;
- frequency/presence penalties (over output tokens): logit -= f * count + p * (count > 0);
- logit_bias: added as is;
- min_tokens: EOS and stop token ids are banned until that many tokens exist.
"""

from __future__ import annotations

import torch

from ember.engine.request import Request


def _padded(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)


def apply_penalties(logits: torch.Tensor, rows: list[int], requests: list[Request]) -> None:
    vocab = logits.shape[1]
    device = logits.device
    params = [r.params for r in requests]
    # Column `vocab` is a sink for padding.
    output_ids = _padded([r.output_token_ids for r in requests], vocab, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device).scatter_add_(
        1, output_ids, torch.ones_like(output_ids, dtype=torch.float32)
    )[:, :vocab]
    sub = logits[rows]
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    if (repetition != 1.0).any():
        all_ids = _padded([r.all_token_ids for r in requests], vocab, device)
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, all_ids, True)
        penalised = torch.where(sub > 0, sub / repetition, sub * repetition)
        sub = torch.where(seen[:, :vocab], penalised, sub)
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    sub = sub - frequency * counts - presence * (counts > 0).float()
    logits[rows] = sub


def apply_logits_processors(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place on fp32 logits [rows, vocab]; row i belongs to requests[i]."""
    penalised = [i for i, r in enumerate(requests) if r.params.needs_penalties]
    if penalised:
        apply_penalties(logits, penalised, [requests[i] for i in penalised])

    bias_rows, bias_cols, bias_vals = [], [], []
    ban_rows, ban_cols = [], []
    vocab = logits.shape[1]
    for i, request in enumerate(requests):
        params = request.params
        if params.logit_bias:
            for token, bias in params.logit_bias.items():
                if token < vocab:
                    bias_rows.append(i)
                    bias_cols.append(token)
                    bias_vals.append(bias)
        if request.num_output_tokens < params.min_tokens:
            for token in (*request.eos_token_ids, *params.stop_token_ids):
                if token < vocab:
                    ban_rows.append(i)
                    ban_cols.append(token)
    if bias_rows:
        logits.index_put_(
            (torch.tensor(bias_rows, device=logits.device), torch.tensor(bias_cols, device=logits.device)),
            torch.tensor(bias_vals, dtype=logits.dtype, device=logits.device),
            accumulate=True,
        )
    if ban_rows:
        logits[ban_rows, ban_cols] = float("-inf")
