"""Building blocks shared by every decoder: norms, rotary embeddings, MLP, attention.

The arithmetic follows transformers' reference implementations step by step
(dtype casts included), so ember's logits match theirs and the trainer's match
the engine's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.models import cpu_ops
from ember.models.attention import AttentionContext, attend
from ember.models.config import ModelConfig, RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics like transformers; in bf16 ember's one-pass kernel (PyTorch's rounds once
        # at the end where transformers rounds before the weight: a last-bit difference).
        return cpu_ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)): a residual add and this norm, fused where ember's kernel applies."""
        return cpu_ops.add_rms_norm(x, delta, self.weight, self.eps)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 (x * (1 + w)), and the whole product is
    taken in fp32 before rounding to the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__(size, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()
        if x.dtype == torch.float32:
            return cpu_ops.rms_norm(x, scale, self.eps)
        return F.rms_norm(x.float(), scale.shape, scale, self.eps).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = x + delta
        return total, self.forward(total)


def make_norm(config: ModelConfig, size: int | None = None) -> RMSNorm:
    return (OffsetRMSNorm if config.family.norm_offset else RMSNorm)(size or config.hidden_size, config.rms_norm_eps)


class Linear(nn.Linear):
    """nn.Linear whose decode-sized products go through ember's CPU GEMV kernel."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # LoRA: the engine's adapter slots (ember.engine.lora.LoRASlots) when it serves adapters, or a
        # trainable adapter (ember.models.lora.TrainableLoRA, a submodule) when ember train fits one.
        self.lora = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_ops.linear(x, self.weight, self.bias)
        return y if self.lora is None else self.lora.add(x, y)

    def rows_function(self):
        """x [rows, in] -> [rows, out] for DecoderLayer.forward_rows (the Parameters themselves are bound:
        weights updated in place reach it)."""
        weight, bias, linear = self.weight, self.bias, cpu_ops.linear
        if self.lora is not None:
            add = self.lora.add
            return lambda x: add(x, linear(x, weight, bias))
        return lambda x: linear(x, weight, bias)


class MergedLinear(Linear):
    """Several HF projections stored as one matrix (one matmul instead of several).

    `shard_names[i]` is the HF module name of rows `output_sizes[i]`; the loader
    and the exporter use them so checkpoints keep transformers' names. With `fused`
    the checkpoint itself holds the merged matrix under this module's name (Phi-3).
    """

    def __init__(self, in_features: int, output_sizes: list[int], shard_names: list[str], bias: bool,
                 fused: bool = False):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)
        self.shard_names = list(shard_names)
        self.fused_checkpoint = fused


class TransposedLinear(Linear):
    """A Linear whose checkpoint stores the weight as [in, out] (HF's Conv1D in GPT-2)."""

    transposed_checkpoint = True


class Rotary:
    """cos/sin tables for the positions of one forward, shared by every layer with this rope (and rotated
    width: `head_dim` is the rotated dims, fewer than the head's under partial rotary)."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        self.rope = rope
        self.head_dim = head_dim
        self._inv_freq: torch.Tensor | None = None
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # CPU: cos, sin [positions, head_dim]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.device.type == "cpu":  # a lookup instead of ~8 small ops per step (the same values)
            tables = self._tables.get(dtype)
            if tables is not None:
                try:  # (the lookup's own bounds check: no max() and item() of the positions every step)
                    return tables[0][positions], tables[1][positions]
                except IndexError:
                    pass
            needed = int(positions.max()) + 1 if positions.numel() else 0
            count = max(needed, 2 * tables[0].shape[0] if tables is not None else 1024)
            tables = self._tables[dtype] = self._compute(torch.arange(count), dtype)
            return tables[0][positions], tables[1][positions]
        return self._compute(positions, dtype)

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = self.rope.inv_freq(self.head_dim).to(positions.device)
        freqs = positions.float().unsqueeze(-1) * self._inv_freq
        if self.rope.type == "longrope":  # past the original context, its long factors (a key's rotation never
            # changes once cached; transformers switches the whole sequence, vLLM the whole batch)
            long = positions.float().unsqueeze(-1) * self.rope.inv_freq(self.head_dim, long=True).to(positions.device)
            freqs = torch.where(positions.unsqueeze(-1) >= self.rope.original_max_position_embeddings, long, freqs)
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = self.rope.attention_scaling()
        cos, sin = emb.cos(), emb.sin()
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., tokens, heads, head_dim]; cos/sin: [..., tokens, rotated dims] (fewer than head_dim:
    partial rotary, the rest passes). transformers' `x * cos + rotate_half(x) * sin`, in one fewer op."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def gated_activation(act, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up for gate_up = [..., gate | up]; SwiGLU in one pass where ember's kernel applies."""
    if act is F.silu and (out := cpu_ops.silu_mul(gate_up)) is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool, fused: bool = False):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act={act!r} is not supported ({sorted(_ACTIVATIONS)})")
        self.gate_up_proj = MergedLinear(hidden, [intermediate] * 2, ["gate_proj", "up_proj"], bias, fused)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward(gated_activation(self.act, self.gate_up_proj.forward(x)))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        spec = config.layers[layer]
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = d = config.head_dim
        self.scale = config.scale
        self.sliding_window = spec.sliding_window
        self.rotary = spec.rope is not None  # False: a NoPE layer
        self.partial_rotary = spec.rotary_dim is not None and spec.rotary_dim < d
        self.softcap = config.attn_softcap
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = MergedLinear(
            config.hidden_size, self.split_sizes, ["q_proj", "k_proj", "v_proj"], config.qkv_bias,
            fused=config.family.fused_checkpoint,
        )
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_bias)
        self.qk_norm = config.family.qk_norm  # per head (Qwen3, Gemma 3) or over the projection (OLMo 2)
        if self.qk_norm:
            self.q_norm = make_norm(config, d if self.qk_norm == "head" else q_size)
            self.k_norm = make_norm(config, d if self.qk_norm == "head" else kv_size)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if config.family.sinks else None
        # Training over a context-parallel group (ember.train.context_parallel): attention over the whole
        # sequence of which this rank holds a slice; None: plain `attend`.
        self.context_parallel = None

    @property
    def plain(self) -> bool:
        """Llama's attention: no q/k norm, full rotary, no soft-capping or sinks (the fused fast paths)."""
        return not self.qk_norm and self.rotary and not self.partial_rotary and self.softcap is None \
            and self.sinks is None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, ctx: AttentionContext | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`rows` (engine only): every token's K/V goes to the cache, the output only for these rows."""
        qkv = self.qkv_proj.forward(x)
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.plain and cpu_ops.rotary_(qkv, cos, sin, heads + kv_heads):  # q and k rotated in place, one pass
            q, k, v = qkv.unflatten(-1, (-1, d)).split([heads, kv_heads, kv_heads], -2)
        elif self.plain:
            qk, v = qkv.split([self.split_sizes[0] + self.split_sizes[1], self.split_sizes[2]], dim=-1)
            # q and k rotate together: one set of elementwise ops instead of two.
            qk = apply_rotary(qk.unflatten(-1, (heads + kv_heads, d)), cos, sin)
            q, k = qk.split([heads, kv_heads], dim=-2)
            v = v.unflatten(-1, (kv_heads, d))
        else:
            q, k, v = qkv.split(self.split_sizes, dim=-1)
            if self.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = q.unflatten(-1, (heads, d)), k.unflatten(-1, (kv_heads, d)), v.unflatten(-1, (kv_heads, d))
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            if self.rotary:
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if ctx is None and self.context_parallel is not None:
            out = self.context_parallel(q, k, v, self.scale, self.sliding_window, self.softcap, self.sinks)
        else:
            out = attend(q, k, v, self.scale, self.layer, ctx, self.sliding_window, self.softcap, self.sinks, rows)
        return self.o_proj.forward(out.flatten(-2))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads, head_dim] through the one-pass kernel where it applies (as forward_rows does: the
        same bits either way), else PyTorch's ops."""
        if x.dim() == 3 and not self.partial_rotary:
            flat = x.contiguous().view(x.shape[0], -1)
            if cpu_ops.rotary_(flat, cos, sin, x.shape[1]):
                return flat.view_as(x)
        return apply_rotary(x, cos, sin)

    @property
    def rows_ready(self) -> bool:
        """Whether DecoderLayer.forward_rows can run this attention: full rotary, no soft-capping or sinks,
        q/k norms per head at most (Qwen3)."""
        return self.rotary and not self.partial_rotary and self.softcap is None and self.sinks is None \
            and self.qk_norm in (None, "head") and (self.qk_norm is None or type(self.q_norm) is RMSNorm)


def _is_sparse(config: ModelConfig, layer: int) -> bool:
    raw, moe = config.raw, config.family.moe
    if moe in ("mixtral", "gpt_oss"):
        return True
    if moe in ("qwen2_moe", "qwen3_moe"):
        step = int(raw.get("decoder_sparse_step", 1))
        return layer not in (raw.get("mlp_only_layers") or []) and (layer + 1) % step == 0
    return False


class DecoderLayer(nn.Module):
    """Attention + gated MLP (or Mixture-of-Experts) block with HF's parameter names, its norms as the
    family places them: "pre" (Llama: input_layernorm before attention, post_attention_layernorm before
    the MLP), "sandwich" (Gemma: a norm before and after each sublayer) or "post" (OLMo 2: after only)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.norm_style = style = config.family.norm
        if style != "post":
            self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = make_norm(config)
        if style == "sandwich":
            self.pre_feedforward_layernorm = make_norm(config)
        if style != "pre":
            self.post_feedforward_layernorm = make_norm(config)
        # Mixtral names its MoE block `block_sparse_moe`; everyone else `mlp`.
        self.ffn_name = "block_sparse_moe" if config.family.moe == "mixtral" else "mlp"
        if _is_sparse(config, layer):
            from ember.models.moe import moe_block

            ffn = moe_block(config)
        else:
            ffn = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias,
                           config.family.fused_checkpoint)
        setattr(self, self.ffn_name, ffn)
        # Tensor parallel (ember.models.tensor_parallel): sums o_proj's and down_proj's partial outputs over the
        # ranks in the row paths below (the modules' own forwards do it themselves); None in one process.
        self.tp_reduce = None

    def forward(self, x, cos, sin, ctx, rows: torch.Tensor | None = None):
        """`rows` (engine only, see AttentionContext.output_rows): the output for these rows alone."""
        # Submodules' forward directly: they carry no hooks (FSDP wraps whole layers), and
        # nn.Module.__call__'s per-call overhead shows in a small model's decode step (BENCHMARKS.md).
        ffn = getattr(self, self.ffn_name)
        if self.norm_style == "pre":
            attn_out = self.self_attn.forward(self.input_layernorm.forward(x), cos, sin, ctx, rows)
            x, h = self.post_attention_layernorm.add_and_norm(x if rows is None else x[rows], attn_out)
            return x + ffn.forward(h)
        h = x if self.norm_style == "post" else self.input_layernorm.forward(x)
        attn_out = self.self_attn.forward(h, cos, sin, ctx, rows)
        x = (x if rows is None else x[rows]) + self.post_attention_layernorm.forward(attn_out)
        h = self.pre_feedforward_layernorm.forward(x) if self.norm_style == "sandwich" else x
        return x + self.post_feedforward_layernorm.forward(ffn.forward(h))

    def forward_cpu_rows(self, x: torch.Tensor, delta: torch.Tensor | None, cos, sin, ctx: AttentionContext,
                         keep: torch.Tensor | None = None):
        """forward() for the engine's bf16 batches on CPU in the pair-packed kernels' row range (after
        `takes_cpu_rows()`): the same kernels in the same order, with the Python between them cut from
        ~25 frames and ~30 module lookups to one frame. That Python runs on caches the products have
        just flushed, so it costs more than its size suggests (BENCHMARKS.md). The residual add is left
        to the next layer's fused add + norm: returns (x, delta) whose sum is this layer's output
        (`delta` None: x alone), for the rows `keep` alone if given (see AttentionContext.output_rows)."""
        (norm1, eps1, qkv_w, qkv_n, qkv_b, heads, kv_heads, head_dim, scale, layer, window,
         o_w, o_n, o_b, norm2, eps2, gate_up_w, gate_up_n, gate_up_b, down_w, down_n, down_b) = self._cpu_rows_plan
        pairs = cpu_ops._pairs  # per call: a weight changed in place (an RL push) is repacked
        qkv_p, o_p, down_p = pairs(qkv_w), pairs(o_w), pairs(down_w)
        swiglu_p = cpu_ops._swiglu_pairs(gate_up_w)  # silu(gate) * up from the product itself
        gate_up_p = swiglu_p if swiglu_p is not None else pairs(gate_up_w)
        if qkv_p is None or o_p is None or gate_up_p is None or down_p is None:  # e.g. inference-tensor weights
            return self.forward(x if delta is None else x + delta, cos, sin, ctx, keep), None
        ops = torch.ops.ember_ops
        if delta is None:
            h = ops.rms_norm.default(x, norm1, eps1)
        else:
            x, h = ops.add_rms_norm.default(x, delta, norm1, eps1)
        rows = x.shape[0]
        qkv = ops.linear_pairs.default(h, qkv_p, qkv_n, qkv_b)
        ops.rotary_.default(qkv, cos, sin, heads + kv_heads)
        q, k, v = qkv.view(rows, -1, head_dim).split_with_sizes([heads, kv_heads, kv_heads], 1)
        if keep is None:
            out = ctx.attend(layer, q, k, v, scale, window).reshape(rows, -1)
        else:
            out = ctx.attend(layer, q, k, v, scale, window, rows=keep).reshape(keep.shape[0], -1)
            x = x[keep]
        attn_out = ops.linear_pairs.default(out.contiguous(), o_p, o_n, o_b)
        if self.tp_reduce is not None:
            attn_out = self.tp_reduce(attn_out)
        x, h = ops.add_rms_norm.default(x, attn_out, norm2, eps2)
        if swiglu_p is not None:
            act = ops.linear_pairs_silu.default(h, swiglu_p, gate_up_n // 2, gate_up_b)
        else:
            act = ops.silu_mul.default(ops.linear_pairs.default(h, gate_up_p, gate_up_n, gate_up_b))
        down = ops.linear_pairs.default(act, down_p, down_n, down_b)
        return x, down if self.tp_reduce is None else self.tp_reduce(down)

    def takes_cpu_rows(self) -> bool:
        """Whether forward_cpu_rows applies (a dense SwiGLU block, bf16 weights, even widths); if so,
        what it needs is gathered once (the Parameter objects: in-place updates reach it)."""
        attn, ffn = self.self_attn, getattr(self, self.ffn_name)
        if not (isinstance(ffn, GatedMLP) and ffn.act is F.silu and self.norm_style == "pre" and attn.plain):
            return False
        norms = (self.input_layernorm, self.post_attention_layernorm)
        projections = (attn.qkv_proj, attn.o_proj, ffn.gate_up_proj, ffn.down_proj)
        if not (all(type(n) is RMSNorm and n.weight.dtype == torch.bfloat16 for n in norms) and all(  # quantized projections aren't Linear
                type(p) in (Linear, MergedLinear) and p.weight.dtype == torch.bfloat16 and p.in_features % 2 == 0
                and p.lora is None for p in projections)):
            return False
        linear = [(p.weight, p.out_features, p.bias) for p in projections]
        self._cpu_rows_plan = (
            self.input_layernorm.weight, self.input_layernorm.eps, *linear[0], attn.num_heads, attn.num_kv_heads,
            attn.head_dim, attn.scale, attn.layer, attn.sliding_window, *linear[1],
            self.post_attention_layernorm.weight, self.post_attention_layernorm.eps, *linear[2], *linear[3])
        return True

    def forward_rows(self, x: torch.Tensor, delta: torch.Tensor | None, cos, sin, ctx: AttentionContext,
                     keep: torch.Tensor | None = None):
        """forward() for the engine's batches on CPU when `takes_rows()`: the same kernels in the same
        order with the Python between them cut to one frame and one call per step (each projection a
        function bound once: ember's integer kernels for quantized weights, cpu_ops.linear for dense).
        A small model's decode step is dozens of layers of small products, where per-op overhead is a
        large share of the time (BENCHMARKS.md). Returns (x, delta) as forward_cpu_rows does (`keep` too)."""
        (norm1, eps1, qkv, heads, kv_heads, head_dim, scale, layer, window, o, norm2, eps2, gate_up, down,
         qk_norm) = self._rows_plan
        ops = torch.ops.ember_ops
        if delta is None:
            h = ops.rms_norm.default(x, norm1, eps1)
        else:
            x, h = ops.add_rms_norm.default(x, delta, norm1, eps1)
        rows = x.shape[0]
        fused = qkv(h)
        if qk_norm is None:
            ops.rotary_.default(fused, cos, sin, heads + kv_heads)
            q, k, v = fused.view(rows, -1, head_dim).split_with_sizes([heads, kv_heads, kv_heads], 1)
        else:  # Qwen3: RMSNorm on each head of q and k, then rotary on each
            q_weight, k_weight, eps = qk_norm
            q, k, v = fused.view(rows, -1, head_dim).split_with_sizes([heads, kv_heads, kv_heads], 1)
            q = ops.rms_norm.default(q.contiguous(), q_weight, eps)
            k = ops.rms_norm.default(k.contiguous(), k_weight, eps)
            ops.rotary_.default(q.view(rows, -1), cos, sin, heads)
            ops.rotary_.default(k.view(rows, -1), cos, sin, kv_heads)
        if keep is None:
            out = ctx.attend(layer, q, k, v, scale, window).reshape(rows, -1)
        else:
            out = ctx.attend(layer, q, k, v, scale, window, rows=keep).reshape(keep.shape[0], -1)
            x = x[keep]
        attn_out, reduce = o(out), self.tp_reduce
        x, h = ops.add_rms_norm.default(x, attn_out if reduce is None else reduce(attn_out), norm2, eps2)
        delta = down(ops.silu_mul.default(gate_up(h)))
        return x, delta if reduce is None else reduce(delta)

    def takes_rows(self, dtype: torch.dtype) -> bool:
        """Whether forward_rows applies to activations of `dtype` (a SwiGLU block whose projections have
        a rows function and whose norms share the dtype); if so, its plan is bound once."""
        attn, ffn = self.self_attn, getattr(self, self.ffn_name)
        if not (isinstance(ffn, GatedMLP) and ffn.act is F.silu and self.norm_style == "pre" and attn.rows_ready):
            return False
        norms = [self.input_layernorm, self.post_attention_layernorm] + ([attn.q_norm, attn.k_norm] if attn.qk_norm else [])
        projections = (attn.qkv_proj, attn.o_proj, ffn.gate_up_proj, ffn.down_proj)
        if not (all(type(n) is RMSNorm and n.weight.dtype == dtype for n in norms)
                and all(hasattr(p, "rows_function") for p in projections)):
            return False
        qkv, o, gate_up, down = (p.rows_function() for p in projections)
        qk_norm = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.qk_norm else None
        self._rows_plan = (
            self.input_layernorm.weight, self.input_layernorm.eps, qkv, attn.num_heads, attn.num_kv_heads,
            attn.head_dim, attn.scale, attn.layer, attn.sliding_window, o,
            self.post_attention_layernorm.weight, self.post_attention_layernorm.eps, gate_up, down, qk_norm)
        return True
