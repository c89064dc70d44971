"""W3 (shared prefix: prefix caching on vs off) and W4 (a long prompt amid decodes:
chunked prefill on vs off), driven step by step through LLMEngine."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from ember.bench.workloads import w3


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class PrefixRun:
    seconds: float
    output_tokens: int
    ttfts: list[float]
    hit_rate: float

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds

    def line(self, name: str) -> str:
        return (f"{name:>14}: {self.output_tps:8.1f} output tok/s  {self.seconds:6.2f} s  TTFT mean "
                f"{statistics.mean(self.ttfts) * 1e3:8.1f} ms  p99 {_pct(self.ttfts, 0.99) * 1e3:8.1f} ms  "
                f"hit rate {self.hit_rate:.2f}")


def run_prefix(llm, num_requests: int = 64) -> PrefixRun:
    from ember import SamplingParams

    engine = llm.engine
    engine.kv.reset_prefix_cache()
    queries0, hits0 = engine.kv.num_queried_tokens, engine.kv.num_hit_tokens
    workload = w3(num_requests)
    params = SamplingParams(temperature=0, max_tokens=workload.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(workload.prompts):
        engine.add_request(f"w3-{i}", prompt, params)
    first: dict[str, float] = {}
    output_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter())
            if out.finished:
                output_tokens += len(out.outputs[0].token_ids)
    seconds = time.perf_counter() - start
    queries = engine.kv.num_queried_tokens - queries0
    hit_rate = (engine.kv.num_hit_tokens - hits0) / queries if queries else 0.0
    return PrefixRun(seconds, output_tokens, [t - start for t in first.values()], hit_rate)


@dataclass
class ChunkRun:
    itls: list[float]  # decoders' gaps between tokens while the long prompt prefills
    long_ttft: float

    def line(self, name: str) -> str:
        return (f"{name:>14}: decoders' ITL during the long prefill p50 {statistics.median(self.itls) * 1e3:7.1f} ms "
                f"p99 {_pct(self.itls, 0.99) * 1e3:7.1f} ms  (long prompt TTFT {self.long_ttft * 1e3:.0f} ms)")


def run_chunked(llm, long_len: int = 4000) -> ChunkRun:
    from ember import SamplingParams

    engine = llm.engine
    engine.kv.reset_prefix_cache()
    rng = np.random.default_rng(4)
    decode_params = SamplingParams(temperature=0, max_tokens=512, ignore_eos=True)
    for i in range(16):
        engine.add_request(f"w4-{i}", rng.integers(100, 30000, size=128).tolist(), decode_params)
    counts: dict[str, int] = {}
    while min(counts.values(), default=0) < 32 or len(counts) < 16:
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
    long_prompt = rng.integers(100, 30000, size=long_len).tolist()
    arrival = time.perf_counter()
    engine.add_request("w4-long", long_prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    last = {rid: arrival for rid in counts}
    itls: list[float] = []
    long_first = None
    while long_first is None:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id == "w4-long":
                long_first = now
            elif out.request_id in last:
                itls.append(now - last[out.request_id])
                last[out.request_id] = now
    for rid in list(engine.output.groups):
        engine.abort_request(rid)
    engine.step()
    return ChunkRun(itls, long_first - arrival)
