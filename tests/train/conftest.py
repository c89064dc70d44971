"""Tiny training setups: a tokenizer, a text corpus and a from-scratch Llama config, written per test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml


def write_config(directory: Path, assets: Path, **overrides) -> Path:
    config = {
        "model": {"tokenizer": str(assets / "tok"), "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 128},
        "data": {"train": [str(assets / "train.txt")], "seq_len": 32},
        "run_dir": str(directory / "run"),
        "zero_stage": 0,
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "max_steps": 20,
        "seed": 0,
        "device": "cpu",  # CPU even where a GPU is present: the references are CPU runs (tests/test_gpu.py covers CUDA)
        "optimizer": {"lr": 0.003, "warmup_steps": 3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, nproc: int = 1, timeout: int = 300) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "ember.cli", "train", "--nproc", str(nproc), str(config)],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = Path(yaml.safe_load(config.read_text())["run_dir"])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}
