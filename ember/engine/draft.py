"""The draft-model proposer: a smaller model with the target's vocabulary proposes k tokens.

Its KV cache has the target's block layout and follows the target's block tables (the same
KV manager hands out blocks for both), so no second allocator exists. Each step it catches
up on the tokens it has not seen (the prompt at first, then the accepted tokens), then runs
k - 1 one-token steps for all speculating requests together.
"""

from __future__ import annotations

import itertools

import torch

from ember.engine.request import Request, SequenceId
from ember.engine.runner import ModelRunner
from ember.engine.spec import SpeculativeConfig
from ember.models import load_model
from ember.models.huge_pages import rehome_weights
from ember.models.config import ModelConfig


class DraftProposer:
    def __init__(self, spec: SpeculativeConfig, target: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, seed: int, attention_backend: str,
                 batch_invariant: bool = False):
        model, config = load_model(spec.model, dtype=dtype, device=device)
        if config.vocab_size != target.vocab_size:
            raise ValueError(
                f"speculative.model: its vocabulary ({config.vocab_size}) differs from the target's ({target.vocab_size})"
            )
        if device.type == "cpu":
            rehome_weights(model)
        self.runner = ModelRunner(model, config, num_blocks, block_size, device, seed + 1, attention_backend,
                                  batch_invariant=batch_invariant)
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)

    def _pick(self, logits: torch.Tensor, request: Request) -> tuple[int, torch.Tensor | None]:
        from ember.engine.sampler import sampling_probs

        if request.params.greedy:
            return int(logits.argmax()), None
        probs = sampling_probs(logits[None], [request.params])[0]
        return int(torch.multinomial(probs, 1, generator=self.generator)), probs

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_drafts: list[int]) -> dict[SequenceId, tuple[list[int], torch.Tensor | None]]:
        """sequence id -> (drafts, their distributions stacked [k, vocab] or None for greedy)."""
        with self.runner.routing():  # the draft's logits too, not only its forwards
            return self._propose(requests, num_drafts)

    def _propose(self, requests: list[Request], num_drafts: list[int]) -> dict[SequenceId, tuple[list[int], torch.Tensor | None]]:
        work = sorted(((r, k) for r, k in zip(requests, num_drafts) if k > 0),
                      key=lambda rk: rk[0].num_tokens - rk[0].num_draft_computed)
        if not work:
            return {}
        drafts: dict[SequenceId, list[int]] = {r.seq_id: [] for r, _ in work}
        probs: dict[SequenceId, list[torch.Tensor]] = {r.seq_id: [] for r, _ in work}
        # catch up on every token the draft has not seen; its last row proposes the first draft
        reqs = [r for r, _ in work]
        lens = [r.num_tokens - r.num_draft_computed for r in reqs]
        ids = [t for r in reqs for t in r.all_token_ids[r.num_draft_computed:]]
        last_rows = list(itertools.accumulate(lens, initial=-1))[1:]
        hidden = self.runner.forward(reqs, lens, [r.num_draft_computed for r in reqs], ids, last_rows)
        if hidden.shape[0] != len(reqs):  # every row's (a model that computes them all)
            hidden = hidden[torch.tensor(last_rows, device=hidden.device)]
        logits = self.runner.model.compute_logits(hidden)
        for (r, _), row in zip(work, logits):
            token, p = self._pick(row, r)
            drafts[r.seq_id].append(token)
            if p is not None:
                probs[r.seq_id].append(p)
            r.num_draft_computed = r.num_tokens
        for step in range(1, max(k for _, k in work)):
            active = [r for r, k in work if k > step]
            if not active:
                break
            hidden = self.runner.forward(active, [1] * len(active), [r.num_tokens + step - 1 for r in active],
                                         [drafts[r.seq_id][-1] for r in active])
            for r, row in zip(active, self.runner.model.compute_logits(hidden)):
                token, p = self._pick(row, r)
                drafts[r.seq_id].append(token)
                if p is not None:
                    probs[r.seq_id].append(p)
                r.num_draft_computed = r.num_tokens + step
        return {rid: (d, torch.stack(probs[rid]) if probs[rid] else None) for rid, d in drafts.items()}
