"""What rank 0 reports of a run besides metrics.jsonl: TensorBoard scalars and the end-of-run summary.

`RunReport.step(record)` after every step; `RunReport.finish(...)` once at the end writes `summary.json`
and logs one line: steps, tokens, wall time, tokens/s, final losses, peak memory, FLOP/s (MFU on a GPU
whose peak is known), the final checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from ember.train.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

SCALARS = ("loss", "lr", "grad_norm", "eval_loss", "tokens_per_s")
# Dense bf16 peak FLOP/s by device-name fragment, first match wins (the vendors' datasheets).
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12))


def check_tensorboard(config: TrainConfig) -> None:
    """Preflight: `tensorboard: true` needs the package (torch.utils.tensorboard imports it)."""
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard: true needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'ember[tensorboard]')")


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense peak FLOP/s for this precision, if known (bf16 on the GPUs listed)."""
    if precision != "bf16":
        return None
    return next((flops for fragment, flops in PEAK_BF16_FLOPS if fragment in device_name), None)


class RunReport:
    """Accumulates a run's steps on every rank; only `enabled` (rank 0) writes anything."""

    def __init__(self, run_dir: Path, config: TrainConfig, enabled: bool, started: float | None = None):
        self.run_dir, self.config, self.enabled = Path(run_dir), config, enabled
        self.started = time.perf_counter() if started is None else started  # (perf_counter time)
        self.steps = self.tokens = self.trained_tokens = 0
        self.train_s = 0.0
        self.writer = None
        if enabled and config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def step(self, record: dict[str, Any], tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens
        self.trained_tokens += int(record.get("trained_tokens", 0))
        self.train_s += record["step_s"]
        if self.writer is not None:
            for key in SCALARS:
                if record.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def finish(self, last: dict[str, Any], params: int, device, world: int) -> dict[str, Any]:
        """The summary (on every rank); rank 0 also logs it and writes summary.json."""
        summary = {
            "steps": last.get("step", self.config.max_steps), "steps_this_run": self.steps, "tokens": self.tokens,
            "trained_tokens": self.trained_tokens, "wall_s": time.perf_counter() - self.started,
            "train_s": self.train_s, "tokens_per_s": self.tokens / self.train_s if self.train_s else None,
            "loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
            "peak_bytes": max(last.get("rank_peak_bytes") or [0]), "checkpoint": last.get("checkpoint"),
            "world_size": world, "params": params,
        }
        flops = 6 * params * self.tokens / self.train_s if self.train_s else 0.0  # forward + backward
        summary["tflops_per_s"] = flops / 1e12
        if device.type == "cuda":
            import torch

            peak = peak_flops(torch.cuda.get_device_name(device), self.config.precision)
            summary["mfu"] = flops / (peak * world) if peak else None
        if self.enabled:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            logger.info("%s", summary_line(summary))
        return summary

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def summary_line(s: dict[str, Any]) -> str:
    def loss(value):
        return "n/a" if value is None else f"{value:.4f}"

    rate = f"{s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] else "no steps"
    mfu = f", MFU {100 * s['mfu']:.1f}%" if s.get("mfu") is not None else ""
    return (f"run summary: {s['steps']} steps ({s['steps_this_run']} this run), {s['tokens']:,} tokens "
            f"({s['trained_tokens']:,} trained) in {s['wall_s']:.1f} s wall, {rate}; loss {loss(s['loss'])}, "
            f"eval_loss {loss(s['eval_loss'])}; peak memory {s['peak_bytes'] / 2**30:.2f} GiB per rank; "
            f"{s['tflops_per_s']:.3g} TFLOP/s achieved{mfu}; checkpoint {s['checkpoint']}")
