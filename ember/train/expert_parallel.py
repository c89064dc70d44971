"""Expert parallelism for MoE training: each rank holds num_experts / world of every MoE layer's
experts, and tokens travel to their experts and back by all-to-all.

The experts become DTensors sharded on the expert axis over the training mesh, so
torch.distributed.checkpoint saves, reshards (resume on another world size) and exports them like
any other parameter. Routers, attention and everything else stay replicated (DDP or FSDP2, which
ignore the experts). Each rank routes its own tokens, so the routers' load-balancing loss is the
one a single process computes for the same micro-batch.

Gradients: an expert's local gradient sums what every rank's loss contributed (the all-to-all's
backward brings them home), while DDP/FSDP average the dense gradients over ranks; dividing the
experts' gradients by the world size makes both the gradient of the mean loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor import DTensor, Shard

from ember.models.moe import MoE


class ExpertDispatch:
    """MoE.dispatcher: rows grouped by global expert -> outputs from the ranks that hold the experts."""

    def __init__(self, group, world: int):
        self.group, self.world = group, world

    def __call__(self, moe: MoE, grouped: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        world, local = self.world, moe.num_experts // self.world
        # counts[e]: my rows for global expert e. Rank r holds experts r*local ... (r+1)*local - 1.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [source rank, local expert]
        send_splits = counts.view(world, local).sum(1).tolist()
        recv_splits = recv_counts.view(world, local).sum(1).tolist()
        received = all_to_all_single(grouped.new_empty(sum(recv_splits), grouped.shape[1]), grouped.contiguous(),
                                     recv_splits, send_splits, group=self.group)
        # Received rows come source-major; regroup them by local expert for one matmul pair each.
        segments = recv_counts.view(world, local)
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=counts.device).repeat(world),
                                                segments.flatten())
        order = expert_of_row.argsort(stable=True)
        # FSDP's mixed precision does not cast the experts it ignores: match the activations here.
        w13, w2 = ((w.to_local() if isinstance(w, DTensor) else w).to(grouped.dtype) for w in (moe.w13, moe.w2))
        out = moe.apply_experts(received[order], segments.sum(0).tolist(), w13, w2)
        out = out[order.argsort()]  # back to source-major order
        return all_to_all_single(grouped.new_empty(grouped.shape), out.contiguous(), send_splits, recv_splits,
                                 group=self.group)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def shard_experts(model: nn.Module, mesh) -> list[nn.Parameter]:
    """Keep this rank's slice of every MoE layer's experts (as DTensors); returns the expert parameters."""
    world, rank = mesh.size(), mesh.get_local_rank()
    params = []
    for m in moe_layers(model):
        local = m.num_experts // world
        for name in ("w13", "w2"):
            full = getattr(m, name).detach()
            shard = full[rank * local:(rank + 1) * local].clone()
            param = nn.Parameter(DTensor.from_local(shard, mesh, [Shard(0)], run_check=False))
            setattr(m, name, param)
            params.append(param)
        m.dispatcher = ExpertDispatch(mesh.get_group(), world)
    return params


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters (empty unless expert-parallel)."""
    return [p for m in moe_layers(model) if m.dispatcher is not None for p in (m.w13, m.w2)]


def scale_expert_grads(params: list[nn.Parameter], world: int) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.div_(world)


def clip_grad_norm(dense: list[nn.Parameter], experts: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over replicated tensors and expert DTensors together: the norm of the whole model."""
    grads = [p.grad for p in dense if p.grad is not None]
    dense_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    expert_grads = [p.grad for p in experts if p.grad is not None]
    expert_norm = torch.nn.utils.get_total_norm(expert_grads) if expert_grads else torch.zeros(())
    if isinstance(expert_norm, DTensor):
        expert_norm = expert_norm.full_tensor()
    if isinstance(dense_norm, DTensor):
        dense_norm = dense_norm.full_tensor()
    total = float(torch.sqrt(dense_norm.double().cpu() ** 2 + expert_norm.double().cpu() ** 2))
    coef = min(1.0, max_norm / (total + 1e-6))  # clip_grad_norm_'s rule
    if coef < 1.0:
        for p in [*dense, *experts]:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total
