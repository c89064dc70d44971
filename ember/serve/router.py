"""`ember router`: one OpenAI endpoint in front of several ember servers (data-parallel replicas).

Each completion or chat request goes where its prompt's prefix is already cached, unless that replica's
queue is much longer than the shortest one (SGLang's cache-aware policy, with a replica's real cache
rather than a guess at it). To place a request the router asks every live replica (POST /router/probe)
for the prompt's block hashes and how many leading blocks it holds; it also remembers which hashes it
has sent where, so requests that share a prefix go together even before the first has been computed.
Among the replicas whose in-flight count is within `balance_threshold` of the least busy, the one
with the longest cached prefix wins; with no prefix anywhere, the least busy one (`round_robin` is there
to compare against).

A replica that refuses connections is marked down and the request goes to another (it never reached the
first); a replica that fails mid-request ends that request with an error (for a stream, a last SSE error
event), never the others. A health loop brings replicas back when /health answers 200 again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

logger = logging.getLogger("ember.router")

POLICIES = ("prefix", "round_robin")
_FORWARDED_HEADERS = ("authorization", "content-type", "x-request-id")


@dataclass
class Replica:
    url: str
    healthy: bool = True
    in_flight: int = 0
    num_requests: int = 0
    routed: OrderedDict = field(default_factory=OrderedDict)  # block hashes sent here, least recent first

    def remembered_blocks(self, hashes: list[str]) -> int:
        count = 0
        for h in hashes:
            if h not in self.routed:
                break
            count += 1
        return count

    def remember(self, hashes: list[str], limit: int) -> None:
        for h in hashes:
            self.routed[h] = None
            self.routed.move_to_end(h)
        while len(self.routed) > limit:
            self.routed.popitem(last=False)


@dataclass(frozen=True)
class RouterConfig:
    backends: tuple[str, ...]
    policy: str = "prefix"
    balance_threshold: int = 8  # in-flight requests a cached prefix may outweigh
    remembered_blocks: int = 200_000  # per replica
    health_interval: float = 1.0

    def __post_init__(self):
        if not self.backends:
            raise ValueError("backend: give at least one replica URL")
        for url in self.backends:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"backend: {url!r} is not an http(s) URL")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: {self.policy!r} is not one of {POLICIES}")
        if self.balance_threshold < 0:
            raise ValueError(f"balance_threshold: {self.balance_threshold} must be >= 0")


class Router:
    def __init__(self, config: RouterConfig, client: httpx.AsyncClient | None = None):
        self.config = config
        self.replicas = [Replica(url.rstrip("/")) for url in config.backends]
        # no read limit (a long generation streams for minutes); a bounded wait for a pooled connection
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0, pool=60.0),
                                                  limits=httpx.Limits(max_connections=1024))
        self._turn = itertools.count()

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    async def _probe(self, replica: Replica, body: dict, headers: dict) -> dict | None:
        keys = {k: body[k] for k in ("prompt", "messages") if k in body}
        try:
            response = await self.client.post(f"{replica.url}/router/probe", json=keys, headers=headers, timeout=30)
            return response.json() if response.status_code == 200 else None
        except (httpx.ConnectError, httpx.ConnectTimeout):
            replica.healthy = False
            return None
        except (httpx.HTTPError, ValueError):  # a slow or odd answer: no cache information from this replica
            return None

    async def place(self, body: dict, headers: dict) -> Replica | None:
        live = self.live()
        if not live:
            return None
        turn = next(self._turn)
        if self.config.policy == "round_robin" or len(live) == 1:
            return live[turn % len(live)]
        probes = await asyncio.gather(*(self._probe(r, body, headers) for r in live))
        hashes = next((p["block_hashes"] for p in probes if p), [])
        cached = {id(r): max(p["cached_blocks"] if p else 0, r.remembered_blocks(hashes)) for r, p in zip(live, probes)}
        live = [r for r in live if r.healthy]  # a probe may have found one gone
        if not live:
            return None
        least = min(r.in_flight for r in live)
        near = [r for r in live if r.in_flight - least <= self.config.balance_threshold]
        # the longest prefix; then the least busy; then in turn (so equal replicas share the load)
        order = {id(r): (i - turn) % len(live) for i, r in enumerate(live)}
        best = min(near, key=lambda r: (-cached[id(r)], r.in_flight, order[id(r)]))
        best.remember(hashes, self.config.remembered_blocks)
        return best

    def least_busy(self) -> Replica | None:
        live = self.live()
        return min(live, key=lambda r: r.in_flight) if live else None

    async def check_health(self) -> None:
        async def check(replica: Replica) -> None:
            try:
                ok = (await self.client.get(f"{replica.url}/health", timeout=5)).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok != replica.healthy:
                logger.warning("replica %s is %s", replica.url, "back" if ok else "down")
            replica.healthy = ok

        await asyncio.gather(*(check(r) for r in self.replicas))


def _error(status: int, message: str) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def build_router_app(config: RouterConfig) -> FastAPI:
    router = Router(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def health_loop():
            while True:
                await router.check_health()
                await asyncio.sleep(config.health_interval)

        task = asyncio.create_task(health_loop())
        yield
        task.cancel()
        await router.client.aclose()

    app = FastAPI(title="ember router", lifespan=lifespan)
    app.state.router = router

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if router.live() else 503)

    @app.get("/router/replicas")
    async def replicas() -> dict:
        return {"policy": config.policy, "replicas": [
            {"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight, "num_requests": r.num_requests}
            for r in router.replicas]}

    async def forward(request: Request, path: str, placed: bool) -> Response:
        raw = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        body: dict = {}
        if placed:
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
        for _ in range(len(router.replicas)):
            replica = await router.place(body, headers) if placed else router.least_busy()
            if replica is None:
                break
            replica.in_flight += 1
            try:
                upstream = await router.client.send(
                    router.client.build_request(request.method, f"{replica.url}{path}", content=raw, headers=headers),
                    stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout):  # it never got the request: another may take it
                replica.in_flight -= 1
                replica.healthy = False
                logger.warning("replica %s refused a connection: marked down", replica.url)
                continue
            except httpx.HTTPError as e:
                replica.in_flight -= 1
                return _error(502, f"replica {replica.url} failed: {type(e).__name__}: {e}")
            replica.num_requests += 1
            if body.get("stream"):
                return StreamingResponse(_relay(upstream, replica), status_code=upstream.status_code,
                                         media_type=upstream.headers.get("content-type"))
            try:
                content = await upstream.aread()
            except httpx.HTTPError as e:
                replica.healthy = False
                return _error(502, f"replica {replica.url} failed mid-request: {type(e).__name__}")
            finally:
                replica.in_flight -= 1  # first: a cancelled close below must not leave it counted
                await asyncio.shield(upstream.aclose())
            return Response(content, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type"))
        return _error(503, "no replica is available")

    def route(path: str, placed: bool):
        async def endpoint(request: Request) -> Response:
            return await forward(request, path, placed)

        return endpoint

    for path in ("/v1/completions", "/v1/chat/completions"):
        app.add_api_route(path, route(path, True), methods=["POST"])
    for path in ("/v1/embeddings", "/tokenize", "/detokenize"):
        app.add_api_route(path, route(path, False), methods=["POST"])
    app.add_api_route("/v1/models", route("/v1/models", False), methods=["GET"])
    return app


async def _relay(upstream: httpx.Response, replica: Replica):
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as e:  # the replica went away mid-stream: this request ends with a reason
        replica.healthy = False
        error = {"error": {"message": f"replica {replica.url} failed mid-stream: {type(e).__name__}",
                           "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        replica.in_flight -= 1  # first: a cancelled close below must not leave it counted
        await asyncio.shield(upstream.aclose())


def run_router(config: RouterConfig, host: str, port: int, sock=None) -> int:
    """Serve until SIGINT/SIGTERM. `sock`: a socket already listening on host:port."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", [])
            if sig == signal.SIGTERM and sig in captured:
                captured.remove(sig)  # SIGTERM is the normal way to stop: exit 0 (and stop the replicas)

    server = Server(uvicorn.Config(build_router_app(config), host=host, port=port, log_level="info"))
    logger.info("routing (%s) over %d replicas on http://%s:%d/v1", config.policy, len(config.backends), host, port)
    server.run(sockets=[sock] if sock is not None else None)
    return 0
