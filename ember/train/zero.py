"""ZeRO stages on PyTorch's own pieces.

- stage 0: DistributedDataParallel (everything replicated, gradients all-reduced);
- stage 1: DDP + ZeroRedundancyOptimizer (optimizer state sharded);
- stage 2: fully_shard (FSDP2) per block and root, reshard_after_forward=False
  (parameters, gradients and optimizer state sharded at rest; no re-gather in backward);
- stage 3: fully_shard with reshard_after_forward=True.
bf16 and fp16 keep fp32 master weights and reduce gradients in fp32: autocast for stages 0-1,
MixedPrecisionPolicy(param_dtype=bf16/fp16, reduce_dtype=fp32) for 2-3 (fp16 adds loss scaling,
ember.train.precision). The optimizer is any of ember.train.optim's, by OptimSpec.type.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ember.train.config import TrainConfig
from ember.train.optim import lr_lambda, optimizer_args  # noqa: F401 - lr_lambda: imported from here too

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}

logger = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def training_device(preference: str, local_world: int) -> str:
    """'cuda' or 'cpu': one GPU per process on a node (nccl), else gloo on CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if preference == "cpu" or (preference == "auto" and gpus < local_world):
        if preference == "auto" and 0 < gpus < local_world:
            logger.warning("device: %d processes per node but %d GPU(s): training on CPU", local_world, gpus)
        return "cpu"
    if gpus < local_world:
        raise ValueError(f"device: 'cuda' needs one GPU per process: {local_world} per node, {gpus} visible")
    return "cuda"


def init_distributed(preference: str = "auto") -> Dist:
    """torchrun's environment -> a process group (gloo on CPU, nccl on CUDA); one process: a local group."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    use_cuda = training_device(preference, local_world) == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not dist.is_initialized():
            dist.init_process_group(backend)
    else:
        rank, world, local_rank = 0, 1, 0
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, local_rank, device)


def run_worker(main, *args) -> None:
    """A torchrun worker's whole life: `main(*args)`, then leave without Python's finalization.

    A DDP model keeps gloo's worker threads alive past destroy_process_group; if one of them drops
    the last reference to a Python tensor while the interpreter is shutting down, it is killed on
    taking the GIL and the process aborts ("terminate called without an active exception", ~10% of
    2-process GRPO runs here; see pytorch/pytorch#179291). Skipping finalization avoids the race.
    """
    import sys
    import traceback

    status = 0
    try:
        main(*args)
    except SystemExit as e:  # as Python reports them
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except KeyboardInterrupt:
        status = 130
    except BaseException as e:  # noqa: BLE001 - the traceback Python would print, then exit status 1
        traceback.print_exc()
        from ember.train.faults import record_error

        record_error(e)  # for torchrun: the launcher's error line names this cause
        status = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def param_groups(model: nn.Module, weight_decay: float, experts: list[nn.Parameter] = ()) -> list[dict]:
    """Decay matrices, not norms or biases; MoE experts in a group of their own (sharded by expert
    parallelism they are DTensors, and the optimizer's fused steps take one kind of tensor per group)."""
    expert_ids = {id(p) for p in experts}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad and id(p) not in expert_ids:  # (a LoRA run's frozen base stays out)
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    experts = [p for p in experts if p.requires_grad]
    return groups + ([{"params": experts, "weight_decay": weight_decay}] if experts else [])


def shard_model(model: nn.Module, config: TrainConfig, d: Dist, materialize=None
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Apply the configured stage; returns the wrapped model and its optimizer. A model on the meta
    device (ZeRO-2/3) gets its storage and values from `materialize(model)` once it is sharded."""
    return shard(model, d, config.zero_stage, config.precision, config.optimizer,
                 offload=config.offload_optimizer or config.offload_params, expert_parallel=config.expert_parallel,
                 materialize=materialize)


def shard(model: nn.Module, d: Dist, zero_stage: int, precision: str, opt, offload: bool = False,
          expert_parallel: bool = False, materialize=None):
    """`shard_model` without a TrainConfig (the RL loop uses it too)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
    )
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ember.train.expert_parallel import moe_layers, shard_experts

    optimizer_class, kwargs = optimizer_args(opt)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and (zero_stage < 2 or materialize is None):
        raise ValueError("a model on the meta device is sharded by ZeRO-2/3 and then materialized")
    if not on_meta:
        model.to(d.device)
    # The mesh names the device: FSDP's default picks CUDA whenever it exists, even for a CPU run.
    mesh = init_device_mesh(d.device.type, (d.world,)) if zero_stage >= 2 or (expert_parallel and d.world > 1) else None
    experts: list[nn.Parameter] = []  # sharded experts (expert-parallel only; preflight checked they divide)
    if expert_parallel and d.world > 1:
        experts = shard_experts(model, mesh)
    # MoE experts get an optimizer group of their own, sharded or not, so checkpoints resume either way.
    expert_group = experts or [p for m in moe_layers(model) for p in (m.w13, m.w2)]
    if zero_stage >= 2:
        mp = MixedPrecisionPolicy(param_dtype=HALF[precision], reduce_dtype=torch.float32) \
            if precision in HALF else MixedPrecisionPolicy()
        offload_policy = {}
        if offload and d.device.type == "cuda":
            # On a CPU-only machine everything already lives in host memory: nothing to move.
            offload_policy = {"offload_policy": CPUOffloadPolicy()}
        reshard = zero_stage == 3
        ignored = {"ignored_params": set(experts)} if experts else {}
        for layer in model.blocks():
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard, **offload_policy, **ignored)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard, **offload_policy, **ignored)
        if on_meta:
            materialize(model)
        return model, optimizer_class(param_groups(model, opt.weight_decay, expert_group), **kwargs)
    if experts:  # DDP averages the replicated parameters only; the experts are sharded, not copies
        names = {id(p): n for n, p in model.named_parameters()}
        DDP._set_params_and_buffers_to_ignore_for_model(model, [names[id(p)] for p in experts])
    wrapped = DDP(model) if d.world > 1 else model
    if zero_stage == 1:
        groups = param_groups(model, opt.weight_decay, expert_group)
        return wrapped, ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **kwargs)
    return wrapped, optimizer_class(param_groups(model, opt.weight_decay, expert_group), **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "model") else model


def autocast(config: TrainConfig, d: Dist):
    if config.precision in HALF and config.zero_stage < 2:
        return torch.autocast(d.device.type, dtype=HALF[config.precision])
    return contextlib.nullcontext()


def no_grad_sync(model: nn.Module, config: TrainConfig, last_micro: bool):
    """Skip gradient communication on all but the last micro-batch of a step."""
    if last_micro:
        return contextlib.nullcontext()
    if config.zero_stage >= 2:
        model.set_requires_gradient_sync(False)
        return _restore_sync(model)
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state (the ZeRO paper's 'model states')."""
    params = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    grads = sum(_local(p.grad).numel() * _local(p.grad).element_size() for p in model.parameters() if p.grad is not None)
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its shard in .optim
    state = 0
    for per_param in inner.state.values():
        for value in per_param.values():
            if torch.is_tensor(value):
                state += _local(value).numel() * _local(value).element_size()
    return {"params": params, "grads": grads, "optimizer": state, "total": params + grads + state}
