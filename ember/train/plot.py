"""`ember train plot RUN_DIR`: loss and throughput curves from metrics.jsonl, as PNG.

loss.png: the training loss (raw, faint, and smoothed) with the held-out loss, then the learning rate
and the gradient norm on the same steps (an RL run: its reward and accuracies instead of the loss);
throughput.png: tokens/s. Each figure is titled with the run directory's name.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"run_dir: {str(run_dir)!r} has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so it starts at the first value;
    by default over about 5% of the points (none for a short run, 0.98 for 1,000 steps)."""
    weight = max(0.0, 1 - 20 / max(1, len(values))) if weight is None else weight
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [r for r in records if r.get(key) is not None]
    return [r["step"] for r in points], [r[key] for r in points]


def _loss_panels(records: list[dict], axes) -> None:
    loss_ax, lr_ax, norm_ax = axes
    steps, loss = _series(records, "loss")
    if loss:
        loss_ax.plot(steps, loss, "-", alpha=0.3, color="C0", label="train loss")
        loss_ax.plot(steps, smooth(loss), "-", color="C0", label="train loss (smoothed)")
    steps, held_out = _series(records, "eval_loss")
    if held_out:
        loss_ax.plot(steps, held_out, "o-", color="C1", label="held-out loss")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    for ax, key, label in ((lr_ax, "lr", "learning rate"), (norm_ax, "grad_norm", "grad norm")):
        ax.plot(*_series(records, key), "-", color="C2")
        ax.set_ylabel(label)


def plot_run(run_dir: str | Path) -> list[Path]:
    from ember._optional import optional_import

    matplotlib = optional_import("matplotlib", "plot", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    where = Path(run_dir).resolve()
    title = f"{where.parent.name}/{where.name}"
    out = []
    rl = any("reward_mean" in r for r in records)
    if rl:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label, style in (("reward_mean", "reward", "-"), ("accuracy", "sampled accuracy", "-"),
                                  ("accuracy_greedy", "greedy accuracy", "o-")):
            if _series(records, key)[0]:
                ax.plot(*_series(records, key), style, label=label)
        ax.set_ylabel("reward / accuracy")
        ax.legend()
        axes = [ax]
    else:
        fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True, height_ratios=(2, 1, 1))
        _loss_panels(records, axes)
    out.append(Path(run_dir) / ("reward.png" if rl else "loss.png"))
    _finish(fig, axes, title, out[-1])

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(records, "tokens_per_s"))
    ax.set_ylabel("tokens / s")
    out.append(Path(run_dir) / "throughput.png")
    _finish(fig, [ax], f"{title}: throughput", out[-1])
    return out


def _finish(fig, axes, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
