"""W5: W1's requests over HTTP (streaming /v1/completions) at several concurrencies.

The server runs as its own process (`ember serve`); this process is the client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember._optional import optional_import
from ember.bench.workloads import Workload

if TYPE_CHECKING:
    import httpx


def _httpx():
    return optional_import("httpx", "bench", "HTTP benchmarks")


@dataclass
class RequestTiming:
    start: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass
class LevelResult:
    concurrency: int
    seconds: float
    timings: list[RequestTiming]

    @property
    def output_tps(self) -> float:
        return sum(t.output_tokens for t in self.timings) / self.seconds

    def summary(self) -> str:
        ttfts = sorted(t.ttft for t in self.timings)
        itls = sorted(x for t in self.timings for x in t.itls) or [0.0]
        pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
        return (f"concurrency {self.concurrency:>3}: {len(self.timings) / self.seconds:6.2f} req/s  "
                f"{self.output_tps:8.1f} output tok/s  TTFT p50 {statistics.median(ttfts) * 1e3:7.1f} ms "
                f"p99 {pct(ttfts, 0.99) * 1e3:7.1f} ms  ITL p50 {statistics.median(itls) * 1e3:6.1f} ms "
                f"p99 {pct(itls, 0.99) * 1e3:6.1f} ms")


async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> RequestTiming:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    timing = RequestTiming(time.perf_counter())
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.output_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                timing.chunk_times.append(time.perf_counter())
    return timing


async def run_level(base_url: str, workload: Workload, concurrency: int) -> LevelResult:
    httpx = _httpx()
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        queue = list(reversed(workload.prompts))
        timings: list[RequestTiming] = []

        async def worker():
            while queue:
                prompt = queue.pop()
                timings.append(await _one(client, url, prompt, workload.max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return LevelResult(concurrency, time.perf_counter() - start, timings)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`ember serve` in a child process, stopped with SIGTERM."""

    def __init__(self, model: str, dtype: str, extra: list[str] = ()):
        httpx = _httpx()
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ember.cli", "serve", "--model", model, "--port", str(self.port),
               "--dtype", dtype, "--served-model-name", "bench", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ember serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.25)
        raise RuntimeError("ember serve did not become healthy")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
