"""`ember train plot RUN_DIR`: loss and throughput curves from metrics.jsonl, as PNG."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"run_dir: {str(run_dir)!r} has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    from ember._optional import optional_import

    matplotlib = optional_import("matplotlib", "plot", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    rl = any("reward_mean" in r for r in records)
    series = ([("reward_mean", "reward", "-"), ("accuracy", "sampled accuracy", "-"),
               ("accuracy_greedy", "greedy accuracy", "o-")] if rl else
              [("loss", "train loss", "-"), ("eval_loss", "held-out loss", "o-")])
    for key, label, style in series:
        points = [r for r in records if r.get(key) is not None]
        if points:
            ax.plot([r["step"] for r in points], [r[key] for r in points], style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy" if rl else "loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(Path(run_dir) / ("reward.png" if rl else "loss.png"))
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    points = [r for r in records if "tokens_per_s" in r]
    ax.plot([r["step"] for r in points], [r["tokens_per_s"] for r in points])
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(Path(run_dir) / "throughput.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out
