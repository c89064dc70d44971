"""Learning-rate schedules by name (no torch): ember's warmup-cosine, constant, and DeepSpeed's five.

`lr_factor(...)(step)` is the multiplier of the optimizer's lr at optimizer step `step` (0-based), for a
LambdaLR. DeepSpeed builds its scheduler at `last_batch_iteration = -1` and steps it after every optimizer
step, so optimizer step s runs with DeepSpeed's formula at k = s - 1; the factors here are those formulas
(deepspeed/runtime/lr_schedules.py) at k = s - 1, quirks included: a log warmup holds warmup_min_lr for
two steps, WarmupCosineLR's first step has lr 0, and warmup_num_steps counts as max(2, n). One ember
extension: warmup_num_steps 0 means no warmup (DeepSpeed refuses 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

REQUIRED = object()

# type -> its params and their defaults (DeepSpeed's constructor defaults)
WARMUP = {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 1000, "warmup_type": "log"}
SCHEDULERS: dict[str, dict[str, Any]] = {
    "cosine": {},  # ember's default: optimizer.warmup_steps linear warmup, then cosine to optimizer.min_lr_ratio
    "constant": {},
    "WarmupLR": WARMUP,
    "WarmupDecayLR": {**WARMUP, "warmup_max_lr": 0.001, "total_num_steps": REQUIRED},
    "WarmupCosineLR": {"total_num_steps": REQUIRED, "warmup_min_ratio": 0.0, "warmup_num_steps": 1000,
                       "cos_min_ratio": 0.0001, "warmup_type": "log"},
    "OneCycle": {"cycle_min_lr": REQUIRED, "cycle_max_lr": REQUIRED, "decay_lr_rate": 0.0,
                 "cycle_first_step_size": 2000, "cycle_second_step_size": None, "cycle_first_stair_count": 0,
                 "cycle_second_stair_count": None, "decay_step_size": 0, "cycle_momentum": True,
                 "cycle_min_mom": 0.8, "cycle_max_mom": 0.9, "decay_mom_rate": 0.0},
    "LRRangeTest": {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 2000, "lr_range_test_step_rate": 1.0,
                    "lr_range_test_staircase": False},
}


def resolve(kind: str, params: dict[str, Any], lr: float, max_steps: int) -> tuple[dict[str, Any], list[str]]:
    """The complete params of a `scheduler:` section (defaults filled, "auto" resolved as Hugging Face's
    Trainer resolves it: min lr 0, max lr = the optimizer's lr, total steps = max_steps, warmup 0), and
    the problems found, as 'scheduler.params.NAME: why' lines."""
    if kind not in SCHEDULERS:
        return {}, [f"scheduler.type: {kind!r} is not supported (one of {', '.join(SCHEDULERS)})"]
    table, problems = SCHEDULERS[kind], []
    auto = {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": 0, "total_num_steps": max_steps}
    out = {}
    for name, value in params.items():
        where = f"scheduler.params.{name}"
        if name == "last_batch_iteration":  # DeepSpeed's resume position; ember resumes from its checkpoints
            if value != -1:
                problems.append(f"{where}: {value!r}: resume with ember's `resume:` (only -1 is accepted)")
        elif name not in table:
            problems.append(f"{where}: unknown for {kind} (valid: {', '.join(table) or 'none'})")
        elif value == "auto" and name not in auto:
            problems.append(f"{where}: 'auto' has nothing to be derived from in ember; give a value")
        elif isinstance(value, (list, tuple)):
            problems.append(f"{where}: per-group values are not supported; give one number")
        else:
            out[name] = auto[name] if value == "auto" else value
    for name, default in table.items():
        out.setdefault(name, default)
        if out[name] is REQUIRED:
            problems.append(f"scheduler.params.{name}: required by {kind}")
    if kind == "WarmupLR" and out["warmup_max_lr"] is None:
        out["warmup_max_lr"] = lr  # DeepSpeed: the optimizer's lr
    if out.get("warmup_type", "log") not in ("log", "linear"):
        problems.append(f"scheduler.params.warmup_type: {out['warmup_type']!r} is not log or linear")
    for name, least in (("warmup_num_steps", 0), ("total_num_steps", 0), ("cycle_first_step_size", 1),
                        ("lr_range_test_step_size", 1)):
        value = out.get(name, least)
        if value is not REQUIRED and not (isinstance(value, (int, float)) and value >= least):
            problems.append(f"scheduler.params.{name}: {value!r} is not a number >= {least}")
    return out, problems


def lr_factor(kind: str, p: dict[str, Any], lr: float, max_steps: int, warmup_steps: int = 0,
              min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """step -> multiplier of `lr` (see the module docstring)."""
    if kind == "cosine":
        return _ember_cosine(warmup_steps, max_steps, min_lr_ratio)
    if kind == "constant":
        return lambda step: 1.0
    absolute = {"WarmupLR": _warmup_lr, "WarmupDecayLR": _warmup_decay_lr, "OneCycle": _one_cycle_lr,
                "LRRangeTest": _range_test_lr}
    if kind in absolute:  # these name lrs, not ratios: divide by the optimizer's
        f = absolute[kind](p)
        return lambda step: f(step - 1) / lr
    f = _warmup_cosine_ratio(p)
    return lambda step: f(step - 1)


def _ember_cosine(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _warmup_gamma(p: dict[str, Any]) -> tuple[int, Callable[[int], float]]:
    """(warmup steps as DeepSpeed counts them, k -> warmup fraction in [0, 1]); k = -1 before the first step."""
    if p["warmup_num_steps"] == 0:
        return 0, lambda k: 1.0
    n = max(2, int(p["warmup_num_steps"]))
    if p["warmup_type"] == "log":
        return n, lambda k: 0.0 if k < 0 else min(1.0, math.log(k + 1) / math.log(n))
    return n, lambda k: 0.0 if k < 0 else min(1.0, k / n)


def _warmup_lr(p: dict[str, Any]) -> Callable[[int], float]:
    _, gamma = _warmup_gamma(p)
    low, high = p["warmup_min_lr"], p["warmup_max_lr"]
    return lambda k: low + (high - low) * gamma(k)


def _warmup_decay_lr(p: dict[str, Any]) -> Callable[[int], float]:
    n, gamma = _warmup_gamma(p)
    low, high, total = p["warmup_min_lr"], p["warmup_max_lr"], p["total_num_steps"]

    def lr(k: int) -> float:
        g = gamma(k) if k < n else max(0.0, (total - k) / max(1.0, total - n))
        return low + (high - low) * min(1.0, g)

    return lr


def _warmup_cosine_ratio(p: dict[str, Any]) -> Callable[[int], float]:
    n, gamma = _warmup_gamma(p)
    start, floor, total = p["warmup_min_ratio"], p["cos_min_ratio"], p["total_num_steps"]

    def ratio(k: int) -> float:
        if k < 0 and n:
            return 0.0  # DeepSpeed's lr before its first scheduler step
        if k < n:
            return start + gamma(k) * (1 - start)
        progress = min(1.0, (k - n + 1) / max(1, total - n))
        return max(0.0, floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)

    return ratio


def _cycle(p: dict[str, Any]) -> tuple[float, Callable[[int], float]]:
    """OneCycle's (cycle length, batch -> scale in [0, 1]) with its staircase option."""
    first = float(p["cycle_first_step_size"])
    second = first if p["cycle_second_step_size"] is None else float(p["cycle_second_step_size"])
    stairs1 = p["cycle_first_stair_count"]
    stairs2 = stairs1 if p["cycle_second_stair_count"] is None else p["cycle_second_stair_count"]
    total = first + second
    ratio = first / total

    def scale(batch: int) -> float:
        x = 1.0 + batch / total - math.floor(1 + batch / total)
        up = x <= ratio
        s, stairs = (x / ratio, stairs1) if up else ((x - 1) / (ratio - 1), stairs2)
        if stairs > 0:
            at = batch % total
            position = at * stairs / first if at <= first else (total - at) * stairs / second
            s = math.floor(position) / stairs
        return s

    return total, scale


def _one_cycle_lr(p: dict[str, Any]) -> Callable[[int], float]:
    total, scale = _cycle(p)
    low, high = p["cycle_min_lr"], p["cycle_max_lr"]

    def lr(k: int) -> float:
        if k < 0:
            return low
        if k < total:
            return low + (high - low) * scale(k + 1)
        if not p["decay_step_size"] or not p["decay_lr_rate"]:
            return low
        return low / (1 + p["decay_lr_rate"] * (k - total + 1) / p["decay_step_size"])

    return lr


def one_cycle_momentum(p: dict[str, Any]) -> Callable[[int], float] | None:
    """OneCycle's first beta at optimizer step `step`, cycled against the lr (None: not cycled). DeepSpeed
    sets betas = (this, 0.99) on optimizers with betas; the first step runs with cycle_min_mom."""
    if not p["cycle_momentum"]:
        return None
    total, scale = _cycle(p)
    low, high = p["cycle_min_mom"], p["cycle_max_mom"]

    def momentum(step: int) -> float:
        k = step - 1
        if k < 0:
            return low
        if k < total:
            return high - (high - low) * scale(k + 1)
        if not p["decay_step_size"] or not p["decay_mom_rate"]:
            return high
        return high * (1 + p["decay_mom_rate"] * (k - total + 1) / p["decay_step_size"])

    return momentum


def _range_test_lr(p: dict[str, Any]) -> Callable[[int], float]:
    size, rate = p["lr_range_test_step_size"], p["lr_range_test_step_rate"]
    interval = (lambda b: math.floor(b / size)) if p["lr_range_test_staircase"] else (lambda b: b / size)
    return lambda k: p["lr_range_test_min_lr"] * (1 + rate * interval(k + 1))
