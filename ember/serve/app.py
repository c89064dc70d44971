"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncLLM, run by uvicorn."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from importlib import resources
import secrets
import signal
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import ember
from ember.engine.async_llm import AsyncLLM
from ember.serve import handlers
from ember.serve.handlers import ServerState
from ember.serve.metrics import Metrics
from ember.serve.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, EmbeddingRequest, ErrorResponse, LoadLoRARequest, ModelList, OpenAIError, PrefixProbeRequest,
    TokenizeRequest, TokenizeResponse, UnloadLoRARequest, random_id,
)

logger = logging.getLogger("ember.serve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_body_mb: float = 16.0
    drain_timeout: float = 30.0
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.max_body_mb <= 0:
            raise ValueError(f"max_body_mb: {self.max_body_mb} must be > 0")


class BodyLimit:
    """413 for bodies over the limit, by Content-Length or by counting a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = OpenAIError(413, f"request body: larger than {self.max_bytes} bytes", code="body_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise OpenAIError(413, too_big.message, code="body_too_large")
            return message

        return await self.app(scope, counting_receive, send)


class RequestContext:
    """Request ids, and the last line of defence. Plain ASGI on purpose: Starlette's
    BaseHTTPMiddleware hides a client's disconnect from the handlers (so a dropped non-streaming
    request would run on to max_tokens), and an exception that reaches Starlette's error middleware
    is re-raised to uvicorn, which closes the connection. Here an unexpected exception becomes a
    JSON 500, or, once a stream has started, a last SSE error event, with the connection kept."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id")
        given = given.decode("latin-1") if given is not None else None
        valid = given if given and _REQUEST_ID.match(given) else None
        scope.setdefault("state", {})["request_id"] = valid
        started = streaming = False

        async def send_with_id(message):
            nonlocal started, streaming
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers") or [])
                streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
                if given is not None:
                    headers.append((b"x-request-id", (valid or "").encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            error = OpenAIError(500, f"internal error: {type(exc).__name__}", type="server_error")
            try:
                if not started:
                    await error_response(error)(scope, receive, send_with_id)
                elif streaming:
                    body = f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except Exception:  # the client has gone: nothing left to tell it
                pass


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"request body: not valid JSON ({first.get('msg')})", None
    field = ".".join(loc) or None
    return f"{field or 'request body'}: {first.get('msg')} (got {first.get('input')!r:.80})", loc[0] if loc else None


def build_app(state: ServerState, config: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if state.llm is not None:
            state.llm.shutdown()

    app = FastAPI(title="ember", version=ember.__version__, lifespan=lifespan,
                  responses={400: {"model": ErrorResponse}})
    app.state.ember = state
    _add_error_handlers(app)
    _add_page_and_probes(app, state)
    _add_api(app, state, config)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, max_bytes=int(config.max_body_mb * (1 << 20)))
    app.add_middleware(RequestContext)  # outermost of ours: sees every exception
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(OpenAIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(OpenAIError(exc.status_code, str(exc.detail), type=kind))


def _add_page_and_probes(app: FastAPI, state: ServerState) -> None:
    """The chat page, and the routes a load balancer or Prometheus calls (no API key)."""
    page = resources.files("ember.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine loop runs; 503 once it has stopped (the server is about to exit)."""
        return Response(status_code=200 if state.llm is None or state.llm.is_healthy else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": ember.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_api(app: FastAPI, state: ServerState, config: ServerConfig) -> None:
    """The OpenAI routes and vLLM's /tokenize and /detokenize, behind the API key if one is set."""
    async def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), config.api_key.encode()):
            raise OpenAIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                              type="authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        state.lora_for(name)  # 404 unless it is the model or one of its adapters

    def request_id(request: Request, prefix: str) -> str:
        return request.state.request_id or random_id(prefix)

    keyed = [Depends(check_key)]

    @app.get("/v1/models", response_model=ModelList, dependencies=keyed)
    async def models():
        base = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "ember",
                "max_model_len": state.max_model_len}
        adapters = [{**base, "id": name, "root": lora.lora_path, "parent": state.model_name}
                    for name, lora in state.adapters.items()]
        return {"object": "list", "data": [base, *adapters]}

    if config.allow_runtime_lora_updating:  # off by default, as in vLLM: it reads paths the client names
        @app.post("/v1/load_lora_adapter", dependencies=keyed)
        async def load_lora_adapter(body: LoadLoRARequest):
            return PlainTextResponse(await handlers.load_lora_adapter(body, state))

        @app.post("/v1/unload_lora_adapter", dependencies=keyed)
        async def unload_lora_adapter(body: UnloadLoRARequest):
            return PlainTextResponse(await handlers.unload_lora_adapter(body, state))

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        return await handlers.create_completion(body, state, request, request_id(request, "cmpl"))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=keyed)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        return await handlers.create_chat_completion(body, state, request, request_id(request, "chatcmpl"))

    @app.post("/v1/embeddings", dependencies=keyed)
    async def embeddings(body: EmbeddingRequest):
        check_model(body.model)
        return await handlers.create_embeddings(body, state)

    @app.post("/tokenize", response_model=TokenizeResponse, dependencies=keyed)
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        ids = await handlers.tokenize(body, state)
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/router/probe", dependencies=keyed, include_in_schema=False)
    async def prefix_probe(body: PrefixProbeRequest):
        """For `ember router`: the prompt's block hashes and how many this replica holds, and its queue."""
        llm = state.generator()
        prompt = body.prompt[0] if isinstance(body.prompt, list) and body.prompt and \
            isinstance(body.prompt[0], (str, list)) else body.prompt
        if body.messages is not None:
            messages = handlers.checked(lambda: [m.for_template() for m in body.messages])
            return await handlers.prepared(llm.prefix_probe(messages=messages))
        if isinstance(prompt, str):
            return await handlers.prepared(llm.prefix_probe(text=prompt))
        if isinstance(prompt, list):
            return await llm.prefix_probe(token_ids=[t for t in prompt if isinstance(t, int)])
        raise OpenAIError(400, "prompt: give 'prompt' or 'messages'", param="prompt")

    @app.post("/detokenize", response_model=DetokenizeResponse, dependencies=keyed)
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        vocab = state.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(400, f"tokens: {bad[:5]} are not token ids in [0, {vocab})", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}


_IDLE_STATS = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0, "prompt_tokens": 0,
               "generation_tokens": 0, "num_preemptions": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0,
               "prefix_cache_hit_rate": 0.0}


def make_state(llm: AsyncLLM | None, model_name: str, embedder=None,
               lora_modules: dict[str, str] | None = None) -> ServerState:
    """`lora_modules`: adapter name -> PEFT directory, each read and checked now (a bad one stops the start)."""
    from concurrent.futures import ThreadPoolExecutor

    from ember.engine.lora import LoRARequest

    stats = llm.get_stats if llm is not None else (lambda: dict(_IDLE_STATS))
    executor = ThreadPoolExecutor(max_workers=1) if embedder is not None else None
    state = ServerState(llm, model_name, Metrics(stats, model_name), embedder=embedder, embed_executor=executor)
    for name, path in (lora_modules or {}).items():
        if llm is None or not llm.serves_lora:
            raise ValueError("lora_modules: adapters need a generative model started with --enable-lora")
        request = LoRARequest(name, next(state.lora_ids), path)
        llm.engine.lora.load(request)
        state.adapters[name] = request
    return state


def run_server(llm: AsyncLLM | None, model_name: str, config: ServerConfig, embedder=None, sock=None,
               lora_modules: dict[str, str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; in-flight requests get `drain_timeout` seconds to finish, then end
    with a 503 (or a last SSE error event) saying the server is shutting down. `sock`: a socket already
    listening on the configured address (bound before the model loaded). Returns the exit status:
    1 if the engine loop died (the server stops rather than answer errors forever), else 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", [])
            if sig == signal.SIGTERM and sig in captured:
                captured.remove(sig)  # a drained SIGTERM is a clean exit (0), not death by signal

        async def shutdown(self, sockets=None):
            if llm is not None:
                asyncio.get_running_loop().call_later(
                    config.drain_timeout, llm.fail_all,
                    f"the server is shutting down (in-flight requests had {config.drain_timeout:g} s to finish)")
            await super().shutdown(sockets)

    app = build_app(make_state(llm, model_name, embedder, lora_modules), config)
    server = Server(uvicorn.Config(  # uvicorn's own cut-off only after ours has ended every request
        app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=config.drain_timeout + 5,
    ))
    died: list[BaseException] = []
    if llm is not None:
        def engine_died(error: BaseException) -> None:
            died.append(error)
            server.should_exit = True  # uvicorn's main loop looks at this every 0.1 s

        llm.on_dead.append(engine_died)
    logger.info("serving %s on http://%s:%d/v1", model_name, config.host, config.port)
    server.run(sockets=[sock] if sock is not None else None)
    if died:
        logger.error("exiting: the engine loop stopped (%s)", died[0])
        return 1
    return 0
