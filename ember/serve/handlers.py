"""/v1/completions, /v1/chat/completions and /v1/embeddings: check the body, prepare and submit
through AsyncLLM's client API, then stream or collect.

The engine returns cumulative outputs; each choice keeps how much text and how many tokens
it has sent, and emits the difference. Both generating endpoints share one response path
(`respond`): they differ only in how a choice is shaped.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ember.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError, RequestStream
from ember.engine.lora import LoRARequest
from ember.engine.output import RequestGroup
from ember.engine.request import CompletionOutput, Logprob, RequestOutput, SamplingParams
from ember.serve.metrics import Metrics
from ember.serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, bad_request, now
from ember.tokenizer import RESERVED_TEMPLATE_KWARGS
from ember.serve.tools import ToolPlan, new_call_id, structured_from_body

logger = logging.getLogger("ember.serve")


@dataclass
class ServerState:
    llm: AsyncLLM | None  # a generative model ...
    model_name: str
    metrics: Metrics
    embedder: Any = None  # ... or an embedding model (EmbeddingEngine)
    embed_executor: Any = None  # one worker thread running embedding batches
    created: int = field(default_factory=now)
    adapters: dict[str, LoRARequest] = field(default_factory=dict)  # LoRA adapters clients select by name
    lora_ids: Any = field(default_factory=lambda: itertools.count(1))

    def lora_for(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's "model" names (None: the base model); 404 for a name not served."""
        if name is None or name == self.model_name:
            return None
        if name in self.adapters:
            return self.adapters[name]
        served = [self.model_name, *self.adapters]
        raise OpenAIError(404, f"model: {name!r} does not exist (this server has {', '.join(map(repr, served))})",
                          param="model", code="model_not_found")

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len if self.llm else self.embedder.max_len

    @property
    def tokenizer(self):
        return self.llm.tokenizer if self.llm else self.embedder.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.llm.vocab_size if self.llm else self.embedder.model_config.vocab_size

    def generator(self) -> AsyncLLM:
        if self.llm is None:
            raise OpenAIError(400, f"model: {self.model_name!r} is an embedding model; use /v1/embeddings",
                              param="model")
        return self.llm


# ---- shared plumbing ------------------------------------------------------------------
@dataclass
class _Tracker:
    """Per-request latency metrics and the one log line per finished request."""

    metrics: Metrics
    request_id: str
    arrival: float = field(default_factory=time.monotonic)
    first: float | None = None
    last: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)

    def on_output(self) -> None:
        t = time.monotonic()
        if self.first is None:
            self.first = t
            self.metrics.ttft.observe(t - self.arrival)
        elif self.last is not None:
            self.metrics.itl.observe(t - self.last)
        self.last = t

    def done(self, outputs: list[RequestOutput]) -> None:
        self.output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        total = time.monotonic() - self.arrival
        self.metrics.e2e.observe(total)
        self.metrics.finished(self.finish_reasons)
        ttft = (self.first - self.arrival) if self.first else None
        logger.info(json.dumps({
            "event": "request_finished", "request_id": self.request_id, "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens, "ttft_s": round(ttft, 4) if ttft is not None else None,
            "total_s": round(total, 4), "finish_reasons": self.finish_reasons,
        }))


MAX_PROMPTS = 128  # prompts in one /v1/completions request (each may ask for n choices)
MAX_SEQUENCES = 256  # prompts x n in one request
MAX_EMBED_INPUTS = 2048  # inputs in one /v1/embeddings request (OpenAI's limit)


def translate(error: Exception) -> OpenAIError:
    if isinstance(error, QueueFullError):
        return OpenAIError(429, str(error), type="rate_limit_error", code="queue_full")
    if isinstance(error, EngineDeadError):
        return OpenAIError(503, str(error), type="server_error")
    if isinstance(error, ValueError):
        return bad_request(error)
    return OpenAIError(500, f"internal error: {error}", type="server_error")


async def prepared(work) -> Any:
    """Await a client `prepare*` call; a ValueError is the client's mistake: 400."""
    try:
        return await work
    except ValueError as e:
        raise bad_request(e) from None


def checked(make: Callable[[], Any]) -> Any:
    """Build something from the body (sampling parameters, messages); a ValueError: 400."""
    try:
        return make()
    except ValueError as e:
        raise bad_request(e) from None


def check_length(prompt_ids: list[int], max_tokens: int | None, max_model_len: int, field_name: str) -> None:
    if max_tokens is not None and max_tokens >= 1 and len(prompt_ids) + max_tokens > max_model_len:
        raise OpenAIError(
            400,
            f"{field_name}: {max_tokens} is too large: the prompt has {len(prompt_ids)} tokens and the model's "
            f"context is {max_model_len} tokens",
            param=field_name,
        )


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await queue.put((i, output))
        except Exception as e:  # surfaced to the consumer below
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def collect(streams: list[RequestStream], http: Request, tracker: _Tracker) -> list[RequestOutput] | None:
    """Final outputs in stream order, or None if the client went away (everything is aborted)."""
    finals: list[RequestOutput | None] = [None] * len(streams)

    async def consume() -> None:
        async for i, output in merged(streams):
            tracker.on_output()
            finals[i] = output

    task = asyncio.create_task(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                try:
                    task.result()  # re-raises an engine error
                except (ValueError, EngineDeadError) as e:
                    raise translate(e) from None
                return finals
            if await http.is_disconnected():
                return None
    finally:
        task.cancel()
        for s in streams:
            s.abort()


def usage(outputs: list[RequestOutput], num_prompt_tokens: int) -> dict[str, Any]:
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": num_prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def guarded(events: AsyncIterator[str], streams: list[RequestStream]) -> AsyncIterator[str]:
    """An SSE body that reports an engine error as a last event, and always aborts its requests
    (a client that disconnects closes this generator)."""
    try:
        async for item in events:
            yield item
    except (ValueError, EngineDeadError) as e:
        yield sse(translate(e).body())
        yield "data: [DONE]\n\n"
    finally:
        for s in streams:
            s.abort()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Shape:
    """How one endpoint shapes its choices; `respond` does the rest."""

    object: str  # the response's "object"; streamed chunks add ".chunk" where the API does

    def final_choices(self, outputs: list[RequestOutput]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def chunk_choices(self, i: int, output: RequestOutput) -> list[dict[str, Any]]:
        raise NotImplementedError

    def first_chunks(self) -> list[dict[str, Any]]:
        return []


async def respond(shape: Shape, chunk_object: str, body, state: ServerState, http: Request, request_id: str,
                  groups: list[RequestGroup]):
    """Submit the groups; then one JSON response, or an event stream of chunks, usage and [DONE]."""
    tracker = _Tracker(state.metrics, request_id, prompt_tokens=sum(len(g.prompt_token_ids) for g in groups))
    try:
        streams = state.llm.submit(groups)
    except (QueueFullError, EngineDeadError) as e:
        raise translate(e) from None
    created = now()

    def envelope(obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": request_id, "object": obj, "created": created, "model": state.model_name,
                "choices": choices, **extra}

    if not body.stream:
        outputs = await collect(streams, http, tracker)
        if outputs is None:
            return JSONResponse({}, status_code=499)  # nobody is listening
        choices = shape.final_choices(outputs)
        tracker.finish_reasons += [c["finish_reason"] for c in choices]
        tracker.done(outputs)
        return JSONResponse(envelope(shape.object, choices, usage=usage(outputs, tracker.prompt_tokens)))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        for choice in shape.first_chunks():
            yield sse(envelope(chunk_object, [choice]))
        finals: dict[int, RequestOutput] = {}
        async for i, output in merged(streams):
            tracker.on_output()
            for choice in shape.chunk_choices(i, output):
                if choice["finish_reason"]:
                    tracker.finish_reasons.append(choice["finish_reason"])
                yield sse(envelope(chunk_object, [choice]))
            if output.finished:
                finals[i] = output
        outputs = [finals[i] for i in sorted(finals)]
        if include_usage:
            yield sse(envelope(chunk_object, [], usage=usage(outputs, tracker.prompt_tokens)))
        yield "data: [DONE]\n\n"
        tracker.done(outputs)

    return StreamingResponse(guarded(events(), streams), media_type="text/event-stream")


# ---- /v1/completions -------------------------------------------------------------------
def completion_logprobs(entries: list[dict[int, Logprob] | None], tokens: list[int], tokenizer,
                        text_offset: int) -> dict[str, Any]:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_offset
    for token, entry in zip(tokens, entries):
        text = tokenizer.decode([token], skip_special_tokens=False)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry[token].logprob)
        out["top_logprobs"].append({lp.decoded_token: lp.logprob for t, lp in entry.items() if lp.rank is not None})
    return out


@dataclass
class _Choice:
    """What one choice has sent so far."""

    text_sent: int = 0
    tokens_sent: int = 0
    finished: bool = False


class CompletionShape(Shape):
    object = "text_completion"

    def __init__(self, body: CompletionRequest, tokenizer, groups: list[RequestGroup], n: int):
        self.body, self.tokenizer, self.n = body, tokenizer, n
        self.prompt_texts = [g.prompt if g.prompt is not None else tokenizer.decode(g.prompt_token_ids)
                             for g in groups]
        self.sent: dict[tuple[int, int], _Choice] = {}

    def _echo(self, i: int, output: RequestOutput) -> tuple[str, dict | None]:
        if not self.body.echo:
            return "", None
        lp = None
        if self.body.logprobs is not None:
            lp = completion_logprobs(output.prompt_logprobs or [None] * len(output.prompt_token_ids),
                                     output.prompt_token_ids, self.tokenizer, 0)
        return self.prompt_texts[i], lp

    def _choice(self, i: int, c: CompletionOutput, sent: _Choice, output: RequestOutput) -> dict[str, Any]:
        """The text (and logprobs) of choice c since `sent`; the echoed prompt leads the first one."""
        text, tokens = c.text[sent.text_sent:], c.token_ids[sent.tokens_sent:]
        prefix, logprobs = self._echo(i, output) if sent.text_sent == sent.tokens_sent == 0 else ("", None)
        if self.body.logprobs is not None:
            new = completion_logprobs(c.logprobs[sent.tokens_sent:sent.tokens_sent + len(tokens)], tokens,
                                      self.tokenizer, len(prefix) + sent.text_sent)
            logprobs = new if logprobs is None else {k: logprobs[k] + new[k] for k in new}
        sent.text_sent, sent.tokens_sent, sent.finished = len(c.text), len(c.token_ids), c.finished
        return {"index": i * self.n + c.index, "text": prefix + text, "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def final_choices(self, outputs: list[RequestOutput]) -> list[dict[str, Any]]:
        return [self._choice(i, c, _Choice(), output) for i, output in enumerate(outputs) for c in output.outputs]

    def chunk_choices(self, i: int, output: RequestOutput) -> list[dict[str, Any]]:
        choices = []
        for c in output.outputs:
            sent = self.sent.setdefault((i, c.index), _Choice())
            if not sent.finished and (len(c.token_ids) > sent.tokens_sent or c.finished):
                choices.append(self._choice(i, c, sent, output))
        return choices


def completion_prompts(body: CompletionRequest) -> list:
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise OpenAIError(400, "prompt: is empty", param="prompt")
    if len(raw) > MAX_PROMPTS:
        raise OpenAIError(400, f"prompt: {len(raw)} prompts in one request; at most {MAX_PROMPTS}", param="prompt")
    return raw


async def create_completion(body: CompletionRequest, state: ServerState, http: Request, request_id: str):
    if body.suffix is not None:
        raise OpenAIError(400, "suffix: is not supported by this server", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise OpenAIError(400, f"best_of: {body.best_of} is not supported (only best_of == n)", param="best_of")
    llm = state.generator()
    raw = completion_prompts(body)
    echo_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    params = checked(lambda: body.sampling_params(body.max_tokens, body.logprobs, echo_logprobs,
                                                    structured=structured_from_body(body)))
    if len(raw) * params.n > MAX_SEQUENCES:
        raise OpenAIError(400, f"n: {len(raw)} prompts x n={params.n} is more than {MAX_SEQUENCES} sequences in one "
                               "request", param="n")
    groups = await prepared(llm.prepare(request_id, raw, params, body.priority, state.lora_for(body.model)))
    for group in groups:
        check_length(group.prompt_token_ids, body.max_tokens, llm.max_model_len, "max_tokens")
    shape = CompletionShape(body, llm.tokenizer, groups, params.n)
    return await respond(shape, "text_completion", body, state, http, request_id, groups)


# ---- /v1/chat/completions ---------------------------------------------------------------
def chat_logprobs(entries: list[dict[int, Logprob]], tokens: list[int], tokenizer, top: int) -> list[dict[str, Any]]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token, entry in zip(tokens, entries):
        ranked = sorted(((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None), key=lambda x: x[0])
        content.append({**item(token, entry[token].logprob),
                        "top_logprobs": [item(t, lp) for _, t, lp in ranked[:top]]})
    return content


@dataclass
class _ChatChoiceStream:
    """Turns one choice's cumulative outputs into chat deltas, tool calls included."""

    index: int
    plan: ToolPlan
    content_sent: int = 0
    tokens_sent: int = 0
    call_id: str | None = None
    finished: bool = False

    def deltas(self, c: CompletionOutput, logprobs) -> list[dict[str, Any]]:
        if self.finished or (len(c.token_ids) == self.tokens_sent and not c.finished):
            return []
        self.tokens_sent, self.finished = len(c.token_ids), c.finished
        out = self._named_call(c) if self.plan.mode == "named" else self._content(c)
        if c.finished and not out:
            out.append({})  # the finish_reason still needs a chunk
        reason = finish_reason(c, self.plan, bool(self.call_id) or any("tool_calls" in d for d in out))
        chunks = [{"index": self.index, "delta": d, "logprobs": None, "finish_reason": None} for d in out]
        chunks[0]["logprobs"] = logprobs
        if c.finished:
            chunks[-1]["finish_reason"] = reason
            chunks[-1]["stop_reason"] = c.stop_reason
        return chunks

    def _named_call(self, c: CompletionOutput) -> list[dict[str, Any]]:
        """A forced function call: its arguments stream as they are generated."""
        out: list[dict[str, Any]] = []
        if self.call_id is None:
            self.call_id = new_call_id()
            out.append({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                        "function": {"name": self.plan.name, "arguments": ""}}]})
        piece = c.text[self.content_sent:]
        self.content_sent = len(c.text)
        if piece:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        return out

    def _content(self, c: CompletionOutput) -> list[dict[str, Any]]:
        """Text, held back while it could be the start of a tool call; the calls once finished."""
        safe = self.plan.streamable_content(c.text, c.finished)
        piece = safe[self.content_sent:]
        self.content_sent = max(self.content_sent, len(safe))
        out: list[dict[str, Any]] = [{"content": piece} if piece or not c.finished else {}]
        if c.finished and self.plan.mode in ("auto", "required"):
            try:
                _, calls = self.plan.parse(c.text)
            except (ValueError, KeyError, TypeError):
                calls = []
            out += [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]
        return out


def finish_reason(c: CompletionOutput, plan: ToolPlan, called: bool) -> str | None:
    if c.finish_reason == "stop" and called and plan.mode != "none":
        return "tool_calls"
    return c.finish_reason


def chat_message(c: CompletionOutput, plan: ToolPlan) -> tuple[dict[str, Any], bool]:
    try:
        content, calls = plan.parse(c.text)
    except (ValueError, KeyError, TypeError):  # cut off by max_tokens: not a complete call
        content, calls = c.text, []
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message, bool(calls)


class ChatShape(Shape):
    object = "chat.completion"

    def __init__(self, body: ChatCompletionRequest, tokenizer, plan: ToolPlan, n: int):
        self.body, self.tokenizer, self.plan, self.n = body, tokenizer, plan, n
        self.top = body.top_logprobs or 0
        self.streams = [_ChatChoiceStream(j, plan) for j in range(n)]

    def _logprobs(self, c: CompletionOutput, start: int, end: int):
        if not self.body.logprobs:
            return None
        return {"content": chat_logprobs(c.logprobs[start:end], c.token_ids[start:end], self.tokenizer, self.top)}

    def final_choices(self, outputs: list[RequestOutput]) -> list[dict[str, Any]]:
        choices = []
        for c in outputs[0].outputs:
            message, called = chat_message(c, self.plan)
            choices.append({"index": c.index, "message": message, "logprobs": self._logprobs(c, 0, len(c.token_ids)),
                            "finish_reason": finish_reason(c, self.plan, called), "stop_reason": c.stop_reason})
        return choices

    def first_chunks(self) -> list[dict[str, Any]]:
        return [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for j in range(self.n)]

    def chunk_choices(self, i: int, output: RequestOutput) -> list[dict[str, Any]]:
        chunks = []
        for c in output.outputs:
            stream = self.streams[c.index]
            chunks += stream.deltas(c, self._logprobs(c, stream.tokens_sent, len(c.token_ids)))
        return chunks


def chat_params(body: ChatCompletionRequest, plan: ToolPlan) -> tuple[SamplingParams, int | None, str]:
    """Sampling parameters (with the response format or forced tool call as the structure), the
    output bound and the field that set it."""
    if body.top_logprobs is not None and not body.logprobs:
        raise OpenAIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    field_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    spec, tool_spec = structured_from_body(body), plan.structured()
    if spec is not None and tool_spec is not None:
        raise OpenAIError(400, "response_format: cannot be combined with tool_choice required or a named function",
                          param="response_format")
    top = body.top_logprobs or 0
    params = checked(lambda: body.sampling_params(max_tokens, top if body.logprobs else None,
                                                    structured=spec or tool_spec))
    return params, max_tokens, field_name


def template_kwargs(body: ChatCompletionRequest, plan: ToolPlan) -> dict[str, Any]:
    kwargs = dict(body.chat_template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise OpenAIError(400, f"chat_template_kwargs: {reserved[0]!r} is set by the request itself, not here",
                          param="chat_template_kwargs")
    if plan.template_tools():
        kwargs["tools"] = plan.template_tools()
    return kwargs


async def create_chat_completion(body: ChatCompletionRequest, state: ServerState, http: Request, request_id: str):
    llm = state.generator()
    plan = ToolPlan.from_body(body.tools, body.tool_choice)
    params, max_tokens, field_name = chat_params(body, plan)
    kwargs = template_kwargs(body, plan)
    messages = checked(lambda: [m.for_template() for m in body.messages])
    group = await prepared(llm.prepare_chat(request_id, messages, params, body.priority,
                                            body.add_generation_prompt, state.lora_for(body.model), **kwargs))
    check_length(group.prompt_token_ids, max_tokens, llm.max_model_len, field_name)
    shape = ChatShape(body, llm.tokenizer, plan, params.n)
    return await respond(shape, "chat.completion.chunk", body, state, http, request_id, [group])


# ---- LoRA adapters at run time (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter) ----------
async def load_lora_adapter(body, state: ServerState) -> str:
    llm = state.generator()
    if body.lora_name in state.adapters or body.lora_name == state.model_name:
        raise OpenAIError(400, f"lora_name: {body.lora_name!r} is already served", param="lora_name")
    request = LoRARequest(body.lora_name, next(state.lora_ids), body.lora_path)
    await prepared(llm.add_lora(request))
    state.adapters[body.lora_name] = request
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


async def unload_lora_adapter(body, state: ServerState) -> str:
    request = state.adapters.pop(body.lora_name, None)
    if request is None:
        raise OpenAIError(404, f"lora_name: {body.lora_name!r} is not a loaded adapter", param="lora_name",
                          code="model_not_found")
    state.generator().remove_lora(request.lora_int_id)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


# ---- /tokenize -------------------------------------------------------------------------------
async def tokenize(body, state: ServerState) -> list[int]:
    if body.messages is None and body.prompt is None:
        raise OpenAIError(400, "prompt: give 'prompt' or 'messages'", param="prompt")
    messages = checked(lambda: [m.for_template() for m in body.messages]) if body.messages is not None else None
    if state.llm is not None:
        return await prepared(state.llm.tokenize(body.prompt, messages, body.add_special_tokens,
                                                 body.add_generation_prompt))
    tokenizer = state.tokenizer  # an embedding model's

    def encode() -> list[int]:
        if messages is not None:
            return tokenizer.encode_chat(messages, body.add_generation_prompt)
        return tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)

    return await prepared(asyncio.get_running_loop().run_in_executor(None, encode))


# ---- /v1/embeddings ----------------------------------------------------------------------------
async def create_embeddings(body, state: ServerState) -> JSONResponse:
    import base64

    import numpy as np

    if state.embedder is None:
        raise OpenAIError(400, f"model: {state.model_name!r} does not produce embeddings", param="model")
    if body.dimensions is not None and body.dimensions != state.embedder.dimensions:
        raise OpenAIError(400, f"dimensions: {body.dimensions} is not supported (this model gives "
                               f"{state.embedder.dimensions})", param="dimensions")
    raw = body.input
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not items:
        raise OpenAIError(400, "input: is empty", param="input")
    if len(items) > MAX_EMBED_INPUTS:
        raise OpenAIError(400, f"input: {len(items)} inputs in one request; at most {MAX_EMBED_INPUTS}", param="input")
    loop = asyncio.get_running_loop()
    try:  # one worker thread: the model runs one batch at a time
        vectors, tokens = await loop.run_in_executor(state.embed_executor, state.embedder.embed, items,
                                                     body.truncate_prompt_tokens)
    except ValueError as e:
        raise bad_request(e) from None
    data = []
    for i, v in enumerate(vectors):
        if body.encoding_format == "base64":
            value: Any = base64.b64encode(v.numpy().astype(np.float32).tobytes()).decode()
        else:
            value = v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse({"object": "list", "data": data, "model": state.model_name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
