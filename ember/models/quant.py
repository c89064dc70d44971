"""Weight-only quantization: int8 per output channel, int4 per group of input channels.

Decoding one sequence on a CPU reads every weight once per token, so its speed is
bytes of weights / memory bandwidth: 8-bit weights halve the bytes, 4-bit ones
quarter them. For a few rows of bf16 activations the products run on ember's kernels
(`cpu_ops.cpp`: integer dot products straight from the packed weights); elsewhere on
PyTorch's weight-only kernels (`aten._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`: the kernels torchao's CPU layouts call). Both are
GEMV-shaped, their cost growing with the number of rows, so for large batches (prefill)
a layer dequantizes its weight once and runs the ordinary matmul (`KERNEL_MAX_ROWS`,
measured in BENCHMARKS.md).

Numerics, per output channel n and input channel k (g = k // group_size):
- int8: w[n, k] = q[n, k] * scale[n], q in [-127, 127] (symmetric).
- int4: w[n, k] = (q[n, k] - zero[g, n]) * scale[g, n], q in [0, 15] (asymmetric,
  as GPTQ and AWQ store it). ember's layout keeps scale and scale * zero per group;
  torch's keeps `(q - 8) * scale + offset` with offset = (8 - zero) * scale.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ember.models import cpu_ops
from ember.models.layers import MergedLinear

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
# Rows at or below which the packed kernels beat dequantize + bf16 matmul (BENCHMARKS.md, issue 10).
KERNEL_MAX_ROWS = 16
_INT4_BLOCK_N = 64  # torch's CPU int4 packing interleaves blocks of 64 output channels


@dataclass(frozen=True)
class QuantConfig:
    method: str  # int8 | int4
    group_size: int = 64  # int4 only
    lm_head: bool = True  # the LM head is the largest matrix of small models
    embeddings: bool = True  # the input embedding table, always int8 (rows are dequantized as looked up)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantization: {self.method!r} is not one of {METHODS}")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantization_group_size: {self.group_size!r} is not one of {GROUP_SIZES}")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 q [N, K], fp32 scale [N]), symmetric absmax per row."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int, min_zero: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q [N, K] int32 in 0..15, scale [G, N], zero [G, N] int32), min/max per group.

    `min_zero=1` keeps zero points >= 1, which GPTQ's v1 format (it stores zero - 1) needs."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    low_zero = zero < min_zero  # the range then starts at -min_zero steps: spread the rest over 15 - min_zero
    scale = torch.where(low_zero, (hi / (15 - min_zero)).clamp(min=1e-8), scale)
    zero = torch.where(low_zero, float(min_zero), zero).clamp(0, 15)
    q = torch.round(w / scale[..., None] + zero[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale.t().contiguous(), zero.t().to(torch.int32).contiguous()


@functools.cache
def _int4_layout_known() -> bool:
    """Whether torch's int4 packing is the layout `_unpack_int4` reads (checked once)."""
    probe = torch.randint(0, 16, (2 * _INT4_BLOCK_N, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    return torch.equal(_unpack_int4(packed, *probe.shape), probe)


def _unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    # Each block of 64 output channels is [k][32] bytes: channel c's nibble is low for c < 32, high otherwise.
    blocks = packed.reshape(n // _INT4_BLOCK_N, k, _INT4_BLOCK_N // 2)
    q = torch.cat((blocks & 15, blocks >> 4), dim=-1)  # [n/64, k, 64]
    return q.transpose(1, 2).reshape(n, k).to(torch.int32)


class QuantizedLinear(nn.Module):
    """A Linear (or merged projection) whose weight is stored in 8 or 4 bits."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 bias: torch.Tensor | None, dtype: torch.dtype, shard_names: list[str] | None = None,
                 output_sizes: list[int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.dtype = dtype
        self.shard_names = shard_names  # set for merged projections (HF names of the row blocks)
        self.output_sizes = output_sizes
        self.bias = nn.Parameter(bias.to(dtype), requires_grad=False) if bias is not None else None
        # Buffers (so .to(device) moves them): GPTQ act-order's input channels in group order, and an
        # unpacked int4 copy where torch's packing is not known.
        self.register_buffer("perm", None)
        self.register_buffer("_own_int4", None)
        self.layout = "aten"  # int4: "ember" (ember's kernel and packing) or "aten" (torch's)

    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor, bias, dtype, **names) -> "QuantizedLinear":
        module = cls(q.shape[1], q.shape[0], 8, None, bias, dtype, **names)
        module.register_buffer("qweight", q.to(torch.int8).contiguous())
        module.register_buffer("scales", scale.to(dtype).contiguous())
        module.register_buffer("scales_f32", scale.float().contiguous())  # for ember's own kernel
        return module

    @classmethod
    def from_int4(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, bias, dtype,
                  **names) -> "QuantizedLinear":
        """q [N, K] in 0..15; scale, zero [K / group_size, N]."""
        n, k = q.shape
        module = cls(k, n, 4, group_size, bias, dtype, **names)
        q = q.to(torch.int32).contiguous()
        scale = scale.float()
        if k % 64 == 0 and (q.device.type != "cpu" or (dtype == torch.bfloat16 and cpu_ops.gemv_available())):
            # ember's kernel: per 64 channels, byte j = channel j (low nibble) | channel 32 + j (high).
            # Off CPU the same packing serves the dequantize path.
            module.layout = "ember"
            halves = q.to(torch.uint8).reshape(n, k // 64, 2, 32)
            module.register_buffer("qweight", (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2))
            module.register_buffer("scales_f32", scale.t().contiguous())  # [N, G]
            module.register_buffer("scaled_zeros", (scale * zero.float()).t().contiguous())
            return module
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.cpu(), 1)  # torch packs on CPU only
        module.register_buffer("qweight", packed.to(q.device))
        offset = (8 - zero.float()) * scale
        module.register_buffer("scale_offsets", torch.stack((scale, offset), dim=-1).to(dtype).contiguous())
        if n % _INT4_BLOCK_N or not _int4_layout_known():
            module._own_int4 = q.to(torch.uint8)
        return module

    @classmethod
    def quantize(cls, linear: nn.Linear, config: QuantConfig) -> "QuantizedLinear":
        weight, dtype = linear.weight.detach(), linear.weight.dtype
        bias = linear.bias.detach() if linear.bias is not None else None
        names = {}
        if isinstance(linear, MergedLinear):
            names = {"shard_names": linear.shard_names, "output_sizes": linear.output_sizes}
        if config.method == "int8":
            q, scale = quantize_int8(weight)
            return cls.from_int8(q, scale, bias, dtype, **names)
        if weight.shape[1] % config.group_size:
            raise ValueError(f"quantization_group_size: {config.group_size} does not divide "
                             f"in_features={weight.shape[1]}")
        q, scale, zero = quantize_int4(weight, config.group_size)
        return cls.from_int4(q, scale, zero, config.group_size, bias, dtype, **names)

    def dequantize(self) -> torch.Tensor:
        """The weight as [N, K] in the compute dtype (input channels in checkpoint order)."""
        n, k = self.out_features, self.in_features
        if self.bits == 8:
            weight = self.qweight * self.scales[:, None]
        elif self.layout == "ember":
            b = self.qweight.reshape(n, k // 64, 1, 32)
            q = torch.cat((b & 15, b >> 4), dim=2).reshape(n, k // self.group_size, self.group_size)
            weight = (q * self.scales_f32[..., None] - self.scaled_zeros[..., None]).to(self.dtype).reshape(n, k)
        else:
            q = self._own_int4 if self._own_int4 is not None else _unpack_int4(self.qweight, n, k)
            scale, offset = self.scale_offsets.unbind(-1)  # [G, N]
            q = q.reshape(n, k // self.group_size, self.group_size).to(self.dtype)
            weight = ((q - 8) * scale.t()[..., None] + offset.t()[..., None]).reshape(n, k)
        if self.perm is not None:
            weight = torch.empty_like(weight).index_copy_(1, self.perm, weight)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > KERNEL_MAX_ROWS or x.device.type != "cpu":
            return F.linear(x, self.dequantize(), self.bias)
        if self.perm is not None:
            flat = flat.index_select(1, self.perm)
        if self.bits == 8:
            out = cpu_ops.int8_linear(flat, self.qweight, self.scales_f32, self.bias)
            if out is not None:
                return out.reshape(*shape[:-1], self.out_features)
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scales)
        elif self.layout == "ember":
            if flat.dtype != torch.bfloat16:
                return F.linear(x, self.dequantize(), self.bias)
            out = torch.ops.ember_ops.linear_gemv_int4(flat.contiguous(), self.qweight, self.group_size,
                                                          self.scales_f32, self.scaled_zeros, self.bias)
            return out.reshape(*shape[:-1], self.out_features)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self.qweight, self.group_size,
                                                             self.scale_offsets)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def hf_parameters(self, prefix: str):
        """The bias under HF names (the quantized weight is not a parameter anything pushes into)."""
        if self.bias is None:
            return {}
        if not self.shard_names:
            return {f"{prefix}bias": (self.bias, ())}
        parent, names, start = prefix.rstrip(".").rpartition(".")[0], {}, 0
        for shard, size in zip(self.shard_names, self.output_sizes):
            names[f"{parent}.{shard}.bias"] = (self.bias, (slice(start, start + size),))
            start += size
        return names

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


class QuantizedEmbedding(nn.Module):
    """An int8 embedding table (per-row scales): rows are dequantized as they are looked up."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)

    @classmethod
    def quantize(cls, embedding: nn.Embedding) -> "QuantizedEmbedding":
        q, scale = quantize_int8(embedding.weight.detach())
        return cls(q, scale.to(embedding.weight.dtype), embedding.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.dtype) * self.scales[ids, None]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace the model's linear layers (and optionally its embedding table) in place.

    A tied int8 LM head and embedding table share one int8 matrix, as they shared one before."""
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is not None and any(isinstance(m, nn.Embedding) and m.weight is lm_head.weight
                                       for m in model.modules())
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and (module is not lm_head or config.lm_head):
                _set_module(model, name, QuantizedLinear.quantize(module, config))
        head = getattr(model, "lm_head", None)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Embedding) and config.embeddings and name.endswith("embed_tokens"):
                if tied and isinstance(head, QuantizedLinear) and head.bits == 8:
                    _set_module(model, name, QuantizedEmbedding(head.qweight, head.scales, head.dtype))
                else:
                    _set_module(model, name, QuantizedEmbedding.quantize(module))
    model.quantization = config
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (tied tensors once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
