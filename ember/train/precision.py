"""fp16 loss scaling with DeepSpeed's rules (deepspeed/runtime/fp16/loss_scaler.py DynamicLossScaler).

The loss is multiplied by the scale before backward, the gradients divided by it before clipping. A
step whose gradient norm is inf or nan is skipped (the optimizer and the LR schedule both stay put)
and, once `hysteresis` overflows have used up their grace, the scale halves (not below min_loss_scale);
after `loss_scale_window` clean steps in a row it doubles. The norm is the whole model's (clipping
reduces it over every rank and shard), so all ranks agree on a skip without another all-reduce.
`loss_scale > 0` is a static scale. For fp32 and bf16 the scaler is off: every call passes through.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ember.train.config import LossScaleSpec

logger = logging.getLogger(__name__)

STATE_FILE = "loss_scaler.json"


class LossScaler:
    def __init__(self, spec: LossScaleSpec | None):
        self.enabled = spec is not None
        spec = spec or LossScaleSpec()
        self.dynamic = self.enabled and spec.loss_scale == 0
        self.scale = float(2 ** spec.initial_scale_power) if self.dynamic else float(spec.loss_scale or 1.0)
        self.window, self.min_scale = spec.loss_scale_window, float(spec.min_loss_scale)
        self.hysteresis = self.grace = spec.hysteresis
        self.consecutive_hysteresis = spec.consecutive_hysteresis
        self.iteration, self.last_overflow, self.skipped = 0, -1, 0
        self.last_scale = self.scale  # the scale the latest step ran with

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params) -> None:
        if self.enabled:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / self.scale)

    def update(self, finite: bool) -> bool:
        """Record a step's outcome; True: take the optimizer and scheduler steps, False: skip them."""
        if not self.enabled:
            return True
        self.last_scale = self.scale
        if not finite:
            self.skipped += 1
        if self.dynamic:
            self._adjust(finite)
        self.iteration += 1
        return finite

    def _adjust(self, finite: bool) -> None:
        if not finite:
            if self.hysteresis == 1 or self.grace == 1:
                if self.scale == self.min_scale:
                    raise RuntimeError(f"fp16: gradients overflow at the minimum loss scale ({self.min_scale:g}); "
                                       "the run cannot continue in fp16 (try bf16 or a lower lr)")
                self.scale = max(self.scale / 2, self.min_scale)
                logger.info("fp16: overflow, step skipped; loss scale %g -> %g", self.last_scale, self.scale)
            else:
                self.grace -= 1
                logger.info("fp16: overflow, step skipped; loss scale %g kept (hysteresis %d left)", self.scale,
                            self.grace)
            self.last_overflow = self.iteration
            return
        if self.consecutive_hysteresis:
            self.grace = self.hysteresis
        stable = self.iteration - self.last_overflow - 1
        if stable > 0 and stable % self.window == 0:
            if not self.consecutive_hysteresis:
                self.grace = self.hysteresis
            self.scale *= 2

    def metrics(self) -> dict:
        return {"loss_scale": self.last_scale, "skipped_steps": self.skipped} if self.enabled else {}

    # ---- checkpoints: the scale and its counters travel with the run --------------------------------
    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "grace", "iteration", "last_overflow", "skipped")}

    def save(self, checkpoint: Path) -> None:
        if self.enabled:
            (Path(checkpoint) / STATE_FILE).write_text(json.dumps(self.state_dict()))

    def load(self, checkpoint: Path) -> None:
        path = Path(checkpoint) / STATE_FILE
        if self.enabled and path.is_file():
            for key, value in json.loads(path.read_text()).items():
                setattr(self, key, value)
            self.last_scale = self.scale
