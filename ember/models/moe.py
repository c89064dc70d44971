"""Mixture-of-Experts MLP: top-k routing, experts stored stacked, tokens grouped per expert.

Mixtral (`block_sparse_moe`): softmax over experts, top-k, renormalised. Qwen2-MoE (`mlp`):
renormalised only if `norm_topk_prob`, plus a shared expert gated by sigmoid(shared_expert_gate);
Qwen3-MoE: the same without a shared expert. Checkpoints keep one tensor per expert
(`experts.E.w1` / `experts.E.gate_proj` ...); `hf_parameters` maps each onto its slice of the
stacked weights. Each forward records the router's load-balancing loss (Switch Transformer:
E * sum_e f_e * P_e) for the trainer. gpt-oss's block (`GptOssMoE`) differs enough to be its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from ember.models import cpu_ops
from ember.models.config import ModelConfig
from ember.models.layers import _ACTIVATIONS, GatedMLP, gated_activation


def moe_block(config: ModelConfig) -> nn.Module:
    return GptOssMoE(config) if config.family.moe == "gpt_oss" else MoE(config, config.family.moe)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, style: str):
        super().__init__()
        raw = config.raw
        self.style = style  # "mixtral" | "qwen2_moe" | "qwen3_moe"
        self.num_experts = int(raw.get("num_local_experts") or raw.get("num_experts"))
        self.top_k = int(raw.get("num_experts_per_tok", 2))
        self.normalize = style == "mixtral" or bool(raw.get("norm_topk_prob", False))
        hidden = config.hidden_size
        inter = int(raw.get("moe_intermediate_size") or config.intermediate_size)
        self.intermediate = inter
        self.gate = nn.Linear(hidden, self.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(self.num_experts, 2 * inter, hidden))  # gate and up, stacked
        self.w2 = nn.Parameter(torch.empty(self.num_experts, hidden, inter))
        self.act = _ACTIVATIONS[config.hidden_act]
        self.shared_expert = self.shared_expert_gate = None
        if style == "qwen2_moe" and raw.get("shared_expert_intermediate_size"):
            self.shared_expert = GatedMLP(hidden, int(raw["shared_expert_intermediate_size"]), config.hidden_act, False)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        self.aux_loss = torch.zeros(())
        # Set by context-parallel training (ember.train.context_parallel): the process group whose ranks
        # hold the other tokens of these sequences; the load-balancing statistics are averaged over it.
        self.token_group = None
        # Set by expert-parallel training (ember.train.expert_parallel): (moe, rows grouped by expert,
        # rows per expert) -> the experts' outputs for those rows, wherever the experts live.
        self.dispatcher = None

    def hf_parameters(self, prefix: str):
        names = {f"{prefix}gate.weight": (self.gate.weight, ())}
        up, gate_name, down = ("w3", "w1", "w2") if self.style == "mixtral" else ("up_proj", "gate_proj", "down_proj")
        inter = self.intermediate
        for e in range(self.num_experts):
            names[f"{prefix}experts.{e}.{gate_name}.weight"] = (self.w13, (e, slice(0, inter)))
            names[f"{prefix}experts.{e}.{up}.weight"] = (self.w13, (e, slice(inter, 2 * inter)))
            names[f"{prefix}experts.{e}.{down}.weight"] = (self.w2, (e,))
        if self.shared_expert is not None:
            names[f"{prefix}shared_expert.gate_proj.weight"] = (self.shared_expert.gate_up_proj.weight,
                                                              (slice(0, self.shared_expert.gate_up_proj.output_sizes[0]),))
            names[f"{prefix}shared_expert.up_proj.weight"] = (self.shared_expert.gate_up_proj.weight,
                                                            (slice(self.shared_expert.gate_up_proj.output_sizes[0], None),))
            names[f"{prefix}shared_expert.down_proj.weight"] = (self.shared_expert.down_proj.weight, ())
            names[f"{prefix}shared_expert_gate.weight"] = (self.shared_expert_gate.weight, ())
        return names

    def apply_experts(self, grouped: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert (counts[e] rows for expert e of w13/w2) -> each row's expert output."""
        out = torch.empty_like(grouped)
        start = 0
        for e, n in enumerate(counts):
            if n:
                gate_up = cpu_ops.expert_linear(grouped[start:start + n], w13, e)
                out[start:start + n] = cpu_ops.expert_linear(gated_activation(self.act, gate_up), w2, e)
                start += n
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).float().softmax(dim=-1)  # [tokens, experts]
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        if self.training:
            routed = F.one_hot(experts, self.num_experts).sum(1).float().mean(0) / self.top_k
            mean_probs = probs.mean(0)
            if self.token_group is not None:  # every rank holds as many tokens: the mean of the means
                size = dist.get_world_size(self.token_group)
                dist.all_reduce(routed, group=self.token_group)
                mean_probs = dist_nn.all_reduce(mean_probs, group=self.token_group)  # (differentiable)
                routed, mean_probs = routed / size, mean_probs / size
            self.aux_loss = self.num_experts * (routed * mean_probs).sum()
        # Group the (token, expert) assignments by expert: one matmul pair per expert, no per-token loop.
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        tokens = order // self.top_k
        counts = torch.bincount(flat, minlength=self.num_experts)
        grouped = x.index_select(0, tokens)
        if self.dispatcher is not None:  # experts on other ranks (expert-parallel training)
            out = self.dispatcher(self, grouped, counts)
        else:
            out = self.apply_experts(grouped, counts.tolist(), self.w13, self.w2)
        out = out * weights.flatten()[order, None]
        result = torch.zeros_like(x).index_add_(0, tokens, out)
        if self.shared_expert is not None:
            result = result + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return result.reshape(shape)


class GptOssExperts(nn.Module):
    """gpt-oss's experts as its checkpoints store them: gate and up interleaved in one [hidden, 2 * inter]
    matrix per expert (x @ W layout, not nn.Linear's), biases, down [inter, hidden]."""

    def __init__(self, experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(experts, hidden, 2 * inter))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(experts, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(experts, inter, hidden))
        self.down_proj_bias = nn.Parameter(torch.empty(experts, hidden))


class GptOssMoE(nn.Module):
    """gpt-oss's MoE: a router with a bias, softmax over the top-k logits only, and a clamped SwiGLU:
    gate <= limit, -limit <= up <= limit, out = (up + 1) * gate * sigmoid(alpha * gate)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        raw = config.raw
        self.num_experts = int(raw.get("num_local_experts") or raw.get("num_experts"))
        self.top_k = int(raw.get("num_experts_per_tok", 4))
        self.alpha = float(raw.get("swiglu_alpha", 1.702))
        self.limit = float(raw.get("swiglu_limit", 7.0))
        self.router = nn.Linear(config.hidden_size, self.num_experts, bias=True)
        self.experts = GptOssExperts(self.num_experts, config.hidden_size, config.intermediate_size)
        self.aux_loss = torch.zeros(())
        self.add_down_bias = True  # tensor parallel: rank 0 only (the ranks' partial sums are added up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top, experts = F.linear(x, self.router.weight, self.router.bias).topk(self.top_k, dim=-1)
        weights = top.softmax(dim=-1)
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        tokens = order // self.top_k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        grouped = x.index_select(0, tokens)
        out = torch.empty_like(grouped)
        e = self.experts
        start = 0
        for expert, n in enumerate(counts):
            if n:
                rows = grouped[start:start + n]
                gate_up = rows @ e.gate_up_proj[expert] + e.gate_up_proj_bias[expert]
                gate = gate_up[..., ::2].clamp(max=self.limit)
                up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
                down = ((up + 1) * (gate * torch.sigmoid(gate * self.alpha))) @ e.down_proj[expert]
                out[start:start + n] = down + e.down_proj_bias[expert] if self.add_down_bias else down
                start += n
        out = out * weights.flatten()[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, out).reshape(shape)


# MXFP4 (OCP microscaling FP4, as gpt-oss's original checkpoints hold the experts): E2M1 values, two per
# byte (low nibble first), one power-of-two scale (E8M0, bias 127) per block of 32.
_FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [E, out, in / 32, 16], scales uint8 [E, out, in / 32] -> [E, in, out] (the layout of
    GptOssExperts' parameters, x @ W)."""
    lut = torch.tensor(_FP4, dtype=torch.float32)
    values = torch.stack((lut[(blocks & 15).long()], lut[(blocks >> 4).long()]), dim=-1).flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).transpose(1, 2).contiguous().to(dtype)
