"""Output processing, in one place: stop conditions, incremental detokenization, stop
strings and their hold-back, logprob entries, grammar acceptance, and RequestOutputs.

The scheduler appends sampled tokens and applies the token-level stops (`check_token_stop`:
EOS, stop token ids, length) as it appends, so a finished request frees its blocks in the
same step. Everything that needs text happens here, after the step; a stop string found
here ends the request through the scheduler (as vLLM v1's output processor does).
One `RequestGroup` per user request holds its n sequences (one engine Request each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ember.engine.request import (
    CompletionOutput, Logprob, Request, RequestOutput, RequestStatus, SequenceId, TokenLogprobs,
)
from ember.engine.sampler import TokenLogprobInfo
from ember.tokenizer import IncrementalDetokenizer, Tokenizer


def check_token_stop(request: Request, max_model_len: int) -> RequestStatus | None:
    """Stops decided by the last token alone: EOS and stop token ids (after min_tokens), length."""
    token = request.output_token_ids[-1]
    if request.num_output_tokens >= request.params.min_tokens:
        if token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in request.params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


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


def logprob_entry(info: TokenLogprobInfo, tokenizer: Tokenizer | None) -> TokenLogprobs:
    """The chosen token first, then the top-k (the chosen token may be among them)."""
    def decoded(token_id: int) -> str | None:
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else None

    entry = {info.token_id: Logprob(info.logprob, info.rank, decoded(info.token_id))}
    for rank, (token_id, logprob) in enumerate(zip(info.top_ids, info.top_logprobs), start=1):
        if token_id not in entry:
            entry[token_id] = Logprob(logprob, rank, decoded(token_id))
    return entry


@dataclass
class Sequence:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    num_processed: int = 0  # output tokens already detokenized

    @property
    def index(self) -> int:
        return self.request.index

    def output(self, hold_back: int) -> CompletionOutput:
        request = self.request
        text = self.text
        if not request.is_finished and hold_back:
            # A partial stop string may sit at the end: keep it back until decided.
            text = text[: max(0, len(text) - hold_back)]
        return CompletionOutput(
            index=request.index,
            text=text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=request.cumulative_logprob if request.logprobs is not None else None,
            logprobs=request.logprobs,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
        )


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

    @property
    def hold_back(self) -> int:
        """Characters a streamed output keeps back: the longest stop string could still be forming."""
        return max((len(s) for s in self.sequences[0].request.params.stop), default=1) - 1

    def make_output(self, weight_version: int = 0) -> RequestOutput:
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
            outputs=[seq.output(self.hold_back) for seq in self.sequences],
            finished=self.finished,
            num_cached_tokens=self.sequences[0].request.num_cached_tokens,
            metrics=metrics,
            weight_version=weight_version,
        )


class OutputProcessor:
    """The engine's live request groups, and what each step's new tokens mean for them."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.groups: dict[str, RequestGroup] = {}
        self.sequences: dict[SequenceId, Sequence] = {}
        self.touched: dict[str, RequestGroup] = {}  # groups with news since the last outputs
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    def add(self, group: RequestGroup) -> None:
        self.groups[group.request_id] = group
        for seq in group.sequences:
            self.sequences[seq.request.seq_id] = seq

    def mark_aborted(self, group: RequestGroup) -> None:
        self.touched[group.request_id] = group  # its final output is due

    def add_prompt_logprobs(self, seq_id: SequenceId, infos: list[TokenLogprobInfo]) -> None:
        group = self.groups[seq_id.request_id]
        if seq_id.index == 0 and group.prompt_logprobs is not None:
            group.prompt_logprobs.extend(logprob_entry(i, self.tokenizer) for i in infos)

    def process_tokens(self, request: Request, infos: list[TokenLogprobInfo] | None, now: float) -> bool:
        """Logprobs, grammar, detokenization and stop strings for the tokens this step appended
        (one, or several when drafts were accepted). A stop string cuts off the tokens after it;
        returns True when one ended a request the scheduler still runs."""
        seq = self.sequences[request.seq_id]
        group = self.groups[request.request_id]
        if group.first_token_time is None:
            group.first_token_time = now
            self.num_prompt_tokens += len(group.prompt_token_ids)
        self.touched[group.request_id] = group
        start = seq.num_processed
        new_tokens = request.output_token_ids[start:]
        stopped = False
        for j, token in enumerate(new_tokens):
            if infos is not None and j < len(infos):
                request.logprobs.append(logprob_entry(infos[j], self.tokenizer))
                request.cumulative_logprob += infos[j].logprob
            if request.matcher is not None and not request.matcher.is_terminated():
                request.matcher.accept_token(token)
            if self._append_text(seq, token, is_last=j == len(new_tokens) - 1):
                request.truncate_output(start + j + 1)
                if request.is_finished:  # the stop string outranks the length limit met by the same token
                    request.status = RequestStatus.FINISHED_STOPPED
                else:
                    stopped = True
                break
        seq.num_processed = request.num_output_tokens
        self.num_generation_tokens += request.num_output_tokens - start
        return stopped

    def _append_text(self, seq: Sequence, token: int, is_last: bool) -> bool:
        """Detokenize one token onto the sequence's text; True if a stop string ended it."""
        request, params = seq.request, seq.request.params
        piece = seq.detokenizer.step(token)
        stopped_by_token = is_last and request.status is RequestStatus.FINISHED_STOPPED and (
            token in request.eos_token_ids or token in params.stop_token_ids)
        if stopped_by_token and not params.include_stop_str_in_output:
            piece = ""
        seq.text += piece
        if not params.stop or not piece:
            return False
        match = find_stop_string(seq.text, len(piece), params.stop, params.include_stop_str_in_output)
        if match is None:
            return False
        seq.text, request.stop_reason = match
        return True

    def outputs(self, finished_only: bool, weight_version: int) -> list[RequestOutput]:
        """An output for every group with news (or only the finished ones: offline batches would
        otherwise rebuild dozens of outputs per step only to drop them); finished groups leave."""
        outputs = []
        for group in self.touched.values():
            if group.finished:
                group.finished_time = group.finished_time or time.monotonic()
                self.groups.pop(group.request_id, None)
                for seq in group.sequences:
                    self.sequences.pop(seq.request.seq_id, None)
            elif finished_only:
                continue
            outputs.append(group.make_output(weight_version))
        self.touched = {}
        return outputs
