"""AsyncLLM: the engine's step loop on its own thread, and the one client API the server uses.

The loop thread owns the engine and is the only one touching its state. Callers on the
event loop use the client methods: `prepare`/`prepare_chat` tokenize, validate and build a
request group on a worker thread (a huge prompt never stalls the event loop), `submit` hands
it to the loop, `abort` cancels; `tokenize`, `tokenizer`, `max_model_len` and `vocab_size`
answer questions about the model. Each request's outputs flow back through its own asyncio
queue, so a slow client never blocks the loop and one request's failure never reaches another.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
from collections.abc import AsyncIterator
from typing import Any

from ember.engine.llm_engine import LLMEngine, PromptType
from ember.engine.output import RequestGroup
from ember.engine.request import RequestOutput, SamplingParams
from ember.engine.tensor_parallel import WorkerDiedError

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine cannot serve the request (its loop failed, or the server is shutting down): HTTP 503."""


# A step that fails fails the requests in it and the loop goes on; this many failures in a row
# mean the engine itself is broken: it stops, /health says 503 and the server exits.
MAX_CONSECUTIVE_FAILURES = 3


class RequestStream:
    """One request's outputs, fed by the loop thread; `abort()` is a no-op once finished."""

    def __init__(self, llm: "AsyncLLM", request_id: str, loop: asyncio.AbstractEventLoop):
        self.llm = llm
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:  # called from the loop thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.llm.abort(self.request_id)


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._num_pending = 0  # submitted, not yet admitted by the loop
        self._pending_lock = threading.Lock()
        self._stats: dict[str, Any] = engine.get_stats()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.dead: BaseException | None = None  # why the loop stopped for good
        self.on_dead: list = []  # callbacks(error), run on the loop thread when it dies
        self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, model: str | None = None, max_waiting: int | None = None, **kwargs) -> "AsyncLLM":
        return cls(LLMEngine.from_args(model, **kwargs), max_waiting=max_waiting)

    # ---- what the model is --------------------------------------------------------
    @property
    def tokenizer(self):
        """Read-only use (decoding single tokens) is safe from any thread."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    # ---- requests (called from the event loop) ----------------------------------
    async def prepare(self, request_id: str, prompts: list[PromptType], params: SamplingParams,
                      priority: int = 0, lora_request=None) -> list[RequestGroup]:
        """One request group per prompt, tokenized and validated on a worker thread (ValueError
        names the field); nothing is queued yet. The engine's ids get a nonce, so a client may
        reuse a request id while the first is still in flight."""
        nonce = secrets.token_hex(4)
        return await _off_loop(lambda: [
            self.engine.make_request_group(f"{request_id}-{nonce}-{i}", prompt, params, priority, lora_request)
            for i, prompt in enumerate(prompts)])

    async def prepare_chat(self, request_id: str, messages: list[dict[str, Any]], params: SamplingParams,
                           priority: int = 0, add_generation_prompt: bool = True, lora_request=None,
                           **template_kwargs: Any) -> RequestGroup:
        """A conversation rendered by the chat template, then as `prepare`."""
        def build() -> list[int]:
            self.engine.check_prompt_chars(sum(len(m["content"] or "") for m in messages), "messages")
            return self.tokenizer.encode_chat(messages, add_generation_prompt, **template_kwargs)

        ids = await _off_loop(build)
        return (await self.prepare(request_id, [ids], params, priority, lora_request))[0]

    async def tokenize(self, text: str | None = None, messages: list[dict[str, Any]] | None = None,
                       add_special_tokens: bool = True, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a text or of a rendered conversation, on a worker thread."""
        def encode() -> list[int]:
            if messages is not None:
                return self.tokenizer.encode_chat(messages, add_generation_prompt)
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

        return await _off_loop(encode)

    async def prefix_probe(self, text: str | None = None, messages: list[dict[str, Any]] | None = None,
                           token_ids: list[int] | None = None) -> dict[str, Any]:
        """For a router: the prompt's block hashes (hex) and how many leading ones this engine has cached,
        with its queue; nothing is queued or computed."""
        if token_ids is None:
            token_ids = await self.tokenize(text, messages)
        kv = self.engine.kv
        hashes = await _off_loop(lambda: kv.prefix_hashes(token_ids))
        stats = self._stats
        return {"block_size": kv.block_size, "num_tokens": len(token_ids), "block_hashes": [h.hex() for h in hashes],
                "cached_blocks": kv.num_cached_blocks(hashes),
                "num_running": stats.get("num_running", 0), "num_waiting": stats.get("num_waiting", 0)}

    # ---- LoRA adapters ----------------------------------------------------------------
    @property
    def serves_lora(self) -> bool:
        return self.engine.lora is not None

    async def add_lora(self, lora_request) -> None:
        """Read and check an adapter (on a worker thread; ValueError says what is wrong)."""
        if self.engine.lora is None:
            raise ValueError("lora: this server was started without --enable-lora")
        await _off_loop(lambda: self.engine.lora.load(lora_request))

    def remove_lora(self, lora_int_id: int) -> None:
        """Forget an adapter (requests already running with it finish with it)."""
        self._commands.put(("forget_lora", lora_int_id, None))

    def submit(self, groups: list[RequestGroup]) -> list["RequestStream"]:
        """Queue prepared groups (all or none: QueueFullError, EngineDeadError at once); iterate
        each returned stream for its group's cumulative outputs."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self.dead}")
        if self._error is not None:
            raise EngineDeadError(f"the engine loop failed: {self._error}")
        if self.max_waiting is not None and \
                self._stats["num_waiting"] + self._num_pending + len(groups) > self.max_waiting:
            raise QueueFullError(f"{self.max_waiting} requests are already waiting")
        loop = asyncio.get_running_loop()
        streams = []
        for group in groups:
            stream = RequestStream(self, group.request_id, loop)
            self._count_pending(+1)
            self._commands.put(("add", group, stream))
            streams.append(stream)
        return streams

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; closing the iterator early aborts it."""
        [stream] = self.submit(await self.prepare(request_id, [prompt], params, priority))
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def _count_pending(self, delta: int) -> None:
        with self._pending_lock:
            self._num_pending += delta

    def fail_all(self, message: str) -> None:
        """End every request in flight with EngineDeadError(message) (e.g. when a shutdown's drain
        time runs out, so clients get a reason rather than a cut connection)."""
        self._commands.put(("fail_all", message, None))

    @property
    def is_healthy(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def get_stats(self) -> dict[str, Any]:
        return dict(self._stats)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams) + self._num_pending

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None, None))
        self._thread.join(timeout)
        if not self._thread.is_alive():  # (a step still running keeps its workers; they die with the process)
            self.engine.shutdown()

    # ---- the loop thread ----------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._drain_commands(block=not engine.has_unfinished_requests())
                    if engine.has_unfinished_requests():
                        self._deliver(engine.step())
                    self._stats = engine.get_stats()
                    failures = 0
                except WorkerDiedError:
                    raise  # no step can run without the rank: the engine is over
                except Exception as e:  # a bug, not bad input (that is refused before it gets here)
                    failures += 1
                    logger.exception("engine step failed (%d in a row)", failures)
                    self._error = e
                    self._fail_streams(f"engine step failed: {e}")
                    if failures >= MAX_CONSECUTIVE_FAILURES:
                        raise
                    engine.step()  # flush the aborts
                    self._error = None
        except BaseException as e:
            self.dead = e
            logger.error("the engine loop has stopped: %s", e)
            self._fail_streams(f"the engine has stopped: {e}")
            for callback in self.on_dead:
                callback(e)

    def _fail_streams(self, message: str) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.put(EngineDeadError(message))
            try:
                self.engine.abort_request(request_id)
            except Exception:  # the engine is already broken; the streams still get their error
                pass
        self._streams.clear()

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload, stream = command
            if kind == "add":
                self._count_pending(-1)
                try:
                    self.engine.add_request_group(payload)
                    self._streams[payload.request_id] = stream
                except ValueError as e:
                    stream.put(e)
            elif kind == "abort" and payload in self._streams:
                del self._streams[payload]
                self.engine.abort_request(payload)
            elif kind == "fail_all":
                self._fail_streams(payload)
            elif kind == "forget_lora" and self.engine.lora is not None:
                self.engine.lora.forget(payload)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]



async def _off_loop(work):
    return await asyncio.get_running_loop().run_in_executor(None, work)
