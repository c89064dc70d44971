"""Optimizers and LR schedulers by type: AdamW, Adam, SGD, Lion; the schedules of ember.train.schedules.

Every optimizer is a plain torch.optim.Optimizer, so ZeroRedundancyOptimizer (stage 1) takes it as its
`optimizer_class` and FSDP2 (stages 2-3) steps it on the DTensor shards.
"""

from __future__ import annotations

import logging

import torch
from torch.optim.lr_scheduler import LambdaLR

from ember.train.config import OptimSpec, TrainConfig
from ember.train.schedules import lr_factor, one_cycle_momentum

logger = logging.getLogger(__name__)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
    interpolated momentum, with decoupled weight decay; one state tensor per parameter."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - lr * wd)
                p.add_(exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_(), alpha=-lr)
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def optimizer_args(opt: OptimSpec) -> tuple[type[torch.optim.Optimizer], dict]:
    """(class, constructor arguments but params and weight decay, which param_groups sets per group)."""
    if opt.type == "sgd":
        return torch.optim.SGD, {"lr": opt.lr, "momentum": opt.momentum, "nesterov": opt.nesterov}
    if opt.type == "lion":
        return Lion, {"lr": opt.lr, "betas": opt.betas}
    cls = torch.optim.Adam if opt.type == "adam" else torch.optim.AdamW  # adam: L2 penalty in the gradient
    return cls, {"lr": opt.lr, "betas": opt.betas, "eps": opt.eps}


def state_template(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    """The state `optimizer` keeps for `p` once it has stepped (what a checkpoint's state is loaded into)."""
    if isinstance(optimizer, torch.optim.SGD):
        return {"momentum_buffer": torch.zeros_like(p)} if optimizer.defaults["momentum"] else {}
    if isinstance(optimizer, Lion):
        return {"exp_avg": torch.zeros_like(p)}
    return {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def lr_lambda(config: TrainConfig):
    s, o = config.scheduler, config.optimizer
    return lr_factor(s.type, s.params, o.lr, config.max_steps, o.warmup_steps, o.min_lr_ratio)


class _CycledMomentum(LambdaLR):
    """LambdaLR that also sets each group's betas to (momentum(step), 0.99), as DeepSpeed's OneCycle does."""

    def __init__(self, optimizer, factor, momentum):
        self.momentum = momentum
        super().__init__(optimizer, factor)

    def step(self, epoch=None):
        super().step(epoch)
        for group in self.optimizer.param_groups:
            group["betas"] = (self.momentum(self.last_epoch), 0.99)

    def state_dict(self):
        return {k: v for k, v in super().state_dict().items() if k != "momentum"}


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LambdaLR:
    momentum = one_cycle_momentum(config.scheduler.params) if config.scheduler.type == "OneCycle" else None
    if momentum is not None and "betas" not in optimizer.defaults:
        logger.warning("scheduler: OneCycle cycles betas; %s has none, so only the lr cycles (as in DeepSpeed)",
                       config.optimizer.type)
        momentum = None
    if momentum is None:
        return LambdaLR(optimizer, lr_lambda(config))
    return _CycledMomentum(optimizer, lr_lambda(config), momentum)
