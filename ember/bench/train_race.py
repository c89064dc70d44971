"""`ember bench train --compare deepspeed`: ember's trainer against DeepSpeed (its own venv, run by
--peer-python) at ZeRO-2 and ZeRO-3 on 2 processes, alternating, on the same model, token windows,
micro-batch, precision (fp32), optimizer and clipping; step time, per-step losses and peak RSS per rank.

Both sides train on the windows ember's data pipeline picks for each (step, rank): they are written
once to an .npz the peer reads, so the losses can be compared step by step. The schedule is constant
on both sides (DeepSpeed gets no scheduler).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WORLD = 2
PEER_SCRIPT = Path(__file__).with_name("train_deepspeed_peer.py")


def ember_config(model: str, work: Path, stage: int, steps: int, micro: int, seq_len: int, lr: float) -> dict:
    return {
        "model": {"path": str(Path(model).resolve())},
        "data": {"train": [str(work / "train.txt")], "seq_len": seq_len, "eval_fraction": 0.0},
        "run_dir": str(work / f"ember-stage{stage}"), "zero_stage": stage, "precision": "fp32",
        "micro_batch_size": micro, "grad_accum": 1, "max_steps": steps, "grad_clip": 1.0, "seed": 0,
        "optimizer": {"type": "adamw", "lr": lr}, "scheduler": {"type": "constant"},
    }


def deepspeed_spec(config: dict, world: int, data: Path) -> dict:
    """What the peer needs to train as `config` (an ember config dict) trains: DeepSpeed's config (fp32,
    no scheduler) and AdamW's arguments, ember's defaults filled in."""
    from ember.train.config import OptimSpec

    opt = OptimSpec.from_dict(config.get("optimizer", {}))
    if opt.type != "adamw" or config.get("precision", "fp32") != "fp32":
        raise ValueError("the DeepSpeed race runs AdamW in fp32")
    if config.get("scheduler", {}).get("type") != "constant":
        raise ValueError("the DeepSpeed race needs scheduler: constant (the peer runs no scheduler)")
    micro, accum = config["micro_batch_size"], config.get("grad_accum") or 1
    ds = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world, "zero_optimization": {"stage": config["zero_stage"]},
        "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }
    if config.get("grad_clip"):
        ds["gradient_clipping"] = config["grad_clip"]
    return {"model": config["model"]["path"], "data": str(data), "ds_config": ds,
            "optimizer": {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}}


def write_windows(config: dict, world: int, out: Path) -> Path:
    """The (inputs, labels) each rank trains on at each step in ember's run of `config`, as one .npz
    [steps, world, micro, seq_len]: ember's tokenizer, packing and seeded order (ember.train.data)."""
    import numpy as np

    from ember.tokenizer import Tokenizer
    from ember.train.config import DataSpec
    from ember.train.data import StepSampler, build_datasets

    micro = config["micro_batch_size"]
    train, _ = build_datasets(DataSpec.from_dict(config["data"]), Tokenizer(config["model"]["path"]), None)
    sampler = StepSampler(len(train), micro * world, config["seed"])
    inputs, labels = [], []
    for step in range(config["max_steps"]):
        pairs = [train.batch(sampler.micro_batch(step, rank, world, 0, micro, 1)) for rank in range(world)]
        inputs.append([x.numpy() for x, _ in pairs])
        labels.append([y.numpy() for _, y in pairs])
    np.savez(out, inputs=np.asarray(inputs), labels=np.asarray(labels))
    return out


@dataclass
class RunResult:
    losses: list[float]
    step_s: float  # median over the steps after the first
    rank_peak_bytes: list[int]


def run_ember(config_path: Path, run_dir: Path) -> RunResult:
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    out = subprocess.run([sys.executable, "-m", "ember.cli", "train", "--nproc", str(WORLD), str(config_path)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"ember failed:\n{out.stderr[-2000:]}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peaks = [max(p) for p in zip(*(r["rank_peak_bytes"] for r in records if "rank_peak_bytes" in r))]
    return RunResult([r["loss"] for r in records], statistics.median(r["step_s"] for r in records[1:]), peaks)


def run_deepspeed(peer_python: str, spec_path: Path) -> RunResult:
    import shutil

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    # Run from a copy beside the spec: a script's folder goes first on sys.path, and ember/bench/kernels.py
    # would shadow the `kernels` package transformers imports.
    script = shutil.copy(PEER_SCRIPT, spec_path.parent / PEER_SCRIPT.name)
    out = subprocess.run([peer_python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
                          str(script), str(spec_path)], capture_output=True, text=True, env=env, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"DeepSpeed failed:\n{out.stderr[-3000:]}")
    r = json.loads(line)
    return RunResult(r["losses"], statistics.median(r["step_s"][1:]), r["rank_peak_bytes"])


def race(args) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ember-bench-race-") as work:
        return _race(args, Path(work))


def _race(args, work: Path) -> int:
    import yaml

    from ember.bench.models import corpus_text

    (work / "train.txt").write_text(corpus_text() * 200)
    tokens = args.micro_batch_size * WORLD * args.seq_len
    print(f"ember vs DeepSpeed ({args.peer_python}), {WORLD} processes, fp32, micro-batch {args.micro_batch_size} x "
          f"{args.seq_len} tokens per rank, {args.steps} steps (median step time of steps 2..), {args.runs} runs "
          f"alternating", flush=True)
    summary = []
    for stage in args.stages:
        config = ember_config(args.model, work, stage, args.steps, args.micro_batch_size, args.seq_len, 1e-4)
        config_path = work / f"ember-stage{stage}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        data = write_windows(config, WORLD, work / f"windows-stage{stage}.npz")
        spec_path = work / f"deepspeed-stage{stage}.json"
        spec_path.write_text(json.dumps(deepspeed_spec(config, WORLD, data)))
        results: dict[str, list[RunResult]] = {"ember": [], "deepspeed": []}
        for i in range(args.runs):
            for name, runs in results.items():
                r = run_ember(config_path, Path(config["run_dir"])) if name == "ember" else \
                    run_deepspeed(args.peer_python, spec_path)
                runs.append(r)
                print(f"  ZeRO-{stage} run {i + 1} {name:>9}: {r.step_s:6.3f} s/step  {tokens / r.step_s:7.1f} tok/s  "
                      f"final loss {r.losses[-1]:.6f}  peak RSS/rank "
                      + " ".join(f"{b / 2**20:.0f}" for b in r.rank_peak_bytes) + " MiB", flush=True)
        summary.append(_summarize(stage, results, tokens))
    for line in summary:
        print(line)
    return 0


def _summarize(stage: int, results: dict, tokens: int) -> str:
    med = {name: statistics.median(r.step_s for r in runs) for name, runs in results.items()}
    spread = {name: (min(r.step_s for r in runs), max(r.step_s for r in runs)) for name, runs in results.items()}
    diff = max(abs(a - b) for e in results["ember"] for d in results["deepspeed"] for a, b in zip(e.losses, d.losses))
    peaks = {name: [max(p) for p in zip(*(r.rank_peak_bytes for r in runs))] for name, runs in results.items()}
    mib = lambda xs: "/".join(f"{x / 2**20:.0f}" for x in xs)
    return (f"ZeRO-{stage}: ember {med['ember']:.3f} s/step ({spread['ember'][0]:.3f}-{spread['ember'][1]:.3f}), "
            f"DeepSpeed {med['deepspeed']:.3f} ({spread['deepspeed'][0]:.3f}-{spread['deepspeed'][1]:.3f}); "
            f"ember/DeepSpeed step throughput {med['deepspeed'] / med['ember']:.2f}x; max |loss difference| per "
            f"step {diff:.2e} (final: ember {results['ember'][0].losses[-1]:.6f}, DeepSpeed "
            f"{results['deepspeed'][0].losses[-1]:.6f}); peak RSS per rank ember {mib(peaks['ember'])} MiB, "
            f"DeepSpeed {mib(peaks['deepspeed'])} MiB")
