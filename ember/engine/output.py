"""Output processing: incremental detokenization, stop strings, and RequestOutputs.

One `RequestGroup` per user request holds its n sequences (one engine Request each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ember.engine.request import CompletionOutput, Logprob, Request, RequestOutput, TokenLogprobs
from ember.engine.sampler import TokenLogprobInfo
from ember.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Sequence:
    request: Request
    index: int
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    num_processed: int = 0  # output tokens already detokenized


@dataclass
class RequestGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Sequence]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.sequences)

    def make_output(self, hold_back: int, weight_version: int = 0) -> RequestOutput:
        outputs = []
        for seq in self.sequences:
            request = seq.request
            text = seq.text
            if not request.is_finished and hold_back:
                # A partial stop string may sit at the end: keep it back until decided.
                text = text[: max(0, len(text) - hold_back)]
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(request.output_token_ids),
                    cumulative_logprob=request.cumulative_logprob if request.logprobs is not None else None,
                    logprobs=request.logprobs,
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                )
            )
        first = self.sequences[0].request
        metrics = {"arrival_time": self.arrival_time}
        if self.first_token_time is not None:
            metrics["first_token_time"] = self.first_token_time
        if self.finished_time is not None:
            metrics["finished_time"] = self.finished_time
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics=metrics,
            weight_version=weight_version,
        )


def logprob_entry(info: TokenLogprobInfo, tokenizer: Tokenizer | None) -> TokenLogprobs:
    """The chosen token first, then the top-k (the chosen token may be among them)."""
    def decoded(token_id: int) -> str | None:
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else None

    entry = {info.token_id: Logprob(info.logprob, info.rank, decoded(info.token_id))}
    for rank, (token_id, logprob) in enumerate(zip(info.top_ids, info.top_logprobs), start=1):
        if token_id not in entry:
            entry[token_id] = Logprob(logprob, rank, decoded(token_id))
    return entry


def find_stop_string(text: str, num_new_chars: int, stops: list[str], include: bool) -> tuple[str, str] | None:
    """Earliest stop string that ends within the new characters -> (truncated text, stop)."""
    best = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return None
    index, stop = best
    return text[: index + len(stop) if include else index], stop
