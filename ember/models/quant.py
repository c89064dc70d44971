"""Weight-only quantization: int8 per output channel, int4 per group of input channels.

Decoding one sequence on a CPU reads every weight once per token, so its speed is
bytes of weights / memory bandwidth: 8-bit weights halve the bytes, 4-bit ones
quarter them. For a few rows of bf16 activations the products run on ember's kernels
(`cpu_ops.cpp`: integer dot products straight from the packed weights); elsewhere on
PyTorch's weight-only kernels (`aten._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`: the kernels torchao's CPU layouts call). Both are
GEMV-shaped, their cost growing with the number of rows, so for large batches (prefill)
a layer dequantizes its weight once and runs the ordinary matmul (`KERNEL_MAX_ROWS`,
measured in BENCHMARKS.md) — except under batch invariance, where every row count stays on the
kernels (`kernel_max_rows`).

Numerics, per output channel n and input channel k (g = k // group_size):
- int8: w[n, k] = q[n, k] * scale[n], q in [-127, 127] (symmetric).
- int4: w[n, k] = (q[n, k] - zero[g, n]) * scale[g, n], q in [0, 15] (asymmetric,
  as GPTQ and AWQ store it). ember's layout keeps scale and scale * zero per group;
  torch's keeps `(q - 8) * scale + offset` with offset = (8 - zero) * scale.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ember.choices import QUANTIZATION_METHODS
from ember.models import cpu_ops
from ember.models.gguf_blocks import PackedWeight
from ember.models.layers import MergedLinear

METHODS = QUANTIZATION_METHODS
GROUP_SIZES = (32, 64, 128, 256)
# Rows at or below which the packed kernels beat dequantize + bf16 matmul (BENCHMARKS.md, issue 10).
KERNEL_MAX_ROWS = 16


def kernel_max_rows() -> int:
    """Rows up to which a quantized product runs on the integer kernels. Batch-invariant (the engine's
    default): any number, since each row's arithmetic there is its own (x quantized per row, integer sums,
    its scales in a fixed order) while dequantize + matmul sums differently: a request's tokens would
    change with the rows beside it (int4: most of 24 greedy tokens did). The cost, BENCHMARKS.md."""
    return sys.maxsize if cpu_ops.batch_invariant_routing() else KERNEL_MAX_ROWS


def _row_limit(layer: "QuantizedLinear", x: torch.Tensor) -> int:
    """kernel_max_rows() where ember's integer kernels take this product: bf16 x (the dtype invariance
    covers) on a CPU with them, a layout of ember's; KERNEL_MAX_ROWS otherwise (torch's weight-only
    kernels, or fp32 x: not claimed invariant, and the integer kernels are up to 3x slower from 256 rows)."""
    if x.dtype == torch.bfloat16 and layer.layout != "aten" and cpu_ops.int_kernels_available():
        return kernel_max_rows()
    return KERNEL_MAX_ROWS
_INT4_BLOCK_N = 64  # torch's CPU int4 packing interleaves blocks of 64 output channels
_TILE = 4  # ember's int4 layout: output channels per tile (kTile in cpu_ops.cpp)


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
        # int4: "ember" (ember's kernel and packing) or "aten" (torch's); int8: "channels" (one scale per
        # output channel) or "groups" (a scale and an optional offset per group of input channels).
        self.layout = "aten" if bits == 4 else "channels"
        self.lora = None  # adapter slots (serving) or a trainable adapter (QLoRA), as on Linear

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
        """q [N, K] in 0..15; scale, zero [K / group_size, N]: w = (q - zero) * scale."""
        scale = scale.float()
        return cls._int4(q, scale.t(), -(scale * zero.float()).t(), group_size, bias, dtype, **names)

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias, dtype, **names) -> "QuantizedLinear":
        """A PackedWeight (w = q * scale + offset per group) as it is: no rounding."""
        n, k = packed.shape
        if packed.bits == 4:
            return cls._int4(packed.q, packed.scale, packed.offset, packed.group, bias, dtype, **names)
        module = cls(k, n, 8, packed.group, bias, dtype, **names)
        module.layout = "groups"
        module.register_buffer("qweight", packed.q.to(torch.int8).contiguous())
        module.register_buffer("group_scales", packed.scale.float().contiguous())  # [N, G]
        module.register_buffer("group_offsets", None if packed.offset is None else packed.offset.float().contiguous())
        return module

    def _set_tiles(self, chunks: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> None:
        """The tiled int4 layout of ember's kernel (cpu_ops.cpp, linear_int4): `chunks` [N, K / 64, 32 bytes]
        become qweight [N/4, K/64, 4, 32]; scale and offset [N, G] become [N/4, G, 4] (fp32); N padded to 4."""
        pad = -chunks.shape[0] % _TILE
        tile = lambda t: F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)).unflatten(0, (-1, _TILE)).transpose(1, 2)  # noqa: E731
        self.register_buffer("qweight", tile(chunks).contiguous())
        self.register_buffer("group_scales", tile(scale.float()).contiguous())
        self.register_buffer("group_offsets", None if offset is None else tile(offset.float()).contiguous())

    @classmethod
    def _int4(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group_size: int, bias, dtype,
              **names) -> "QuantizedLinear":
        """q [N, K] in 0..15; scale, offset [N, K / group_size]: w = q * scale + offset."""
        n, k = q.shape
        module = cls(k, n, 4, group_size, bias, dtype, **names)
        q = q.to(torch.int32).contiguous()
        aten_packs = n % 16 == 0  # torch's CPU int4 packing takes output channels in multiples of 16
        if k % 64 == 0 and (q.device.type != "cpu" or not aten_packs or (
                dtype in (torch.bfloat16, torch.float32) and cpu_ops.int_kernels_available())):
            # ember's kernel: per 64 channels, byte j = channel j (low nibble) | channel 32 + j (high), in tiles
            # of 4 output channels (_set_tiles).
            # Off CPU (or without the kernel, where torch cannot pack this shape) it serves the dequantize path.
            module.layout = "ember"
            halves = q.to(torch.uint8).reshape(n, k // 64, 2, 32)
            module._set_tiles(halves[:, :, 0] | (halves[:, :, 1] << 4), scale, offset)
            return module
        if not aten_packs:  # held as int8 per group instead (0..15 fit): the same values, exactly
            module.bits, module.layout = 8, "groups"
            module.register_buffer("qweight", q.to(torch.int8))
            module.register_buffer("group_scales", scale.float().contiguous())
            module.register_buffer("group_offsets", None if offset is None else offset.float().contiguous())
            return module
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.cpu(), 1)  # torch packs on CPU only
        module.register_buffer("qweight", packed.to(q.device))
        offset = 8 * scale.float() + (0 if offset is None else offset.float())  # torch's: (q - 8) * scale + offset
        module.register_buffer("scale_offsets", torch.stack((scale.t(), offset.t()), dim=-1).to(dtype).contiguous())
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
        if self.layout in ("groups", "ember"):
            q, scales, offsets = self.qweight, self.group_scales, self.group_offsets
            if self.layout == "ember":  # untile ([N/4, X, 4, ...] -> [N, X, ...]), unpack low then high nibbles
                untile = lambda t: None if t is None else t.transpose(1, 2).flatten(0, 1)[:n]  # noqa: E731
                q, scales, offsets = untile(q), untile(scales), untile(offsets)
                b = q.reshape(n, k // 64, 1, 32)
                q = torch.cat((b & 15, b >> 4), dim=2)
            w = q.reshape(n, k // self.group_size, self.group_size) * scales[..., None]
            if offsets is not None:
                w = w + offsets[..., None]
            weight = w.to(self.dtype).reshape(n, k)
        elif self.bits == 8:
            weight = self.qweight * self.scales[:, None]
        else:
            q = self._own_int4 if self._own_int4 is not None else _unpack_int4(self.qweight, n, k)
            scale, offset = self.scale_offsets.unbind(-1)  # [G, N]
            q = q.reshape(n, k // self.group_size, self.group_size).to(self.dtype)
            weight = ((q - 8) * scale.t()[..., None] + offset.t()[..., None]).reshape(n, k)
        if self.perm is not None:
            weight = torch.empty_like(weight).index_copy_(1, self.perm, weight)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward(x)
        return y if self.lora is None else self.lora.add(x, y)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        max_rows = _row_limit(self, flat)
        if flat.shape[0] > max_rows or x.device.type != "cpu":
            return F.linear(x, self.dequantize(), self.bias)
        if self.perm is not None:
            flat = flat.index_select(1, self.perm)
        if self.layout in ("ember", "groups"):
            if not cpu_ops.int_kernel_ok(flat, max_rows):
                return F.linear(x, self.dequantize(), self.bias)
            out = self._kernel(flat.contiguous())
            return out.reshape(*shape[:-1], self.out_features)
        if self.bits == 8:
            out = cpu_ops.int8_linear(flat, self.qweight, self.scales_f32, self.bias, max_rows)
            if out is not None:
                return out.reshape(*shape[:-1], self.out_features)
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self.qweight, self.group_size,
                                                             self.scale_offsets)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def rows_function(self):
        """x [rows, in] -> [rows, out] for the engine's decoder-layer fast path (DecoderLayer.forward_rows):
        ember's kernel called directly for up to _row_limit rows, forward() otherwise."""
        if self.perm is not None or self.layout == "aten" or not cpu_ops.int_kernels_available() \
                or self.qweight.device.type != "cpu":
            # the class's forward: tensor parallel wraps the instance's with an all-reduce the row path does itself
            return QuantizedLinear.forward.__get__(self)
        op, args = self._kernel_call()
        bias, forward = self.bias, self._forward
        if self.lora is not None:
            add = self.lora.add
            return lambda x: add(x, op(x, *args, bias) if x.shape[0] <= _row_limit(self, x) else forward(x))
        return lambda x: op(x, *args, bias) if x.shape[0] <= _row_limit(self, x) else forward(x)

    def _kernel_call(self):
        """(ember's op for this layout, its arguments between x and the bias)."""
        ops = torch.ops.ember_ops
        if self.layout == "ember":
            return ops.linear_int4.default, (self.qweight, self.out_features, self.group_size, self.group_scales,
                                             self.group_offsets)
        if self.layout == "groups":
            return ops.linear_groups.default, (self.qweight, self.group_size, self.group_scales, self.group_offsets)
        return ops.linear_gemv.default, (self.qweight, self.scales_f32)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        op, args = self._kernel_call()
        return op(x, *args, self.bias)

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
    """An int8 embedding table: rows are dequantized as they are looked up. One scale per row
    (ember's own), or a scale and an optional offset per group of columns (a GGUF's blocks)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                 offsets: torch.Tensor | None = None, group_size: int | None = None):
        super().__init__()
        self.dtype = dtype
        self.group_size = group_size  # None: scales [V], one per row
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)

    @classmethod
    def quantize(cls, embedding: nn.Embedding) -> "QuantizedEmbedding":
        q, scale = quantize_int8(embedding.weight.detach())
        return cls(q, scale.to(embedding.weight.dtype), embedding.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return self.qweight[ids].to(self.dtype) * self.scales[ids, None]
        rows = self.qweight[ids].unflatten(-1, (-1, self.group_size)) * self.scales[ids][..., None]
        if self.offsets is not None:
            rows = rows + self.offsets[ids][..., None]
        return rows.flatten(-2).to(self.dtype)


def concat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Packed shards of a merged projection as one weight: as they are when their formats agree,
    else all as int8 with the smallest group (exact either way)."""
    if len({(p.bits, p.group) for p in parts}) > 1:
        group = min(p.group for p in parts)
        parts = [p.as_int8(group) for p in parts]
    offsets = None
    if any(p.offset is not None for p in parts):
        offsets = torch.cat([p.offset if p.offset is not None else torch.zeros_like(p.scale) for p in parts])
    return PackedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), offsets,
                        parts[0].group, parts[0].bits)


def install_packed(model: nn.Module, packed: dict[str, PackedWeight], dtype: torch.dtype, source: str) -> None:
    """Put weights that arrive quantized (`packed`, by HF name) into the model as they are: each
    linear layer whose weight(s) are there becomes a QuantizedLinear (a merged projection from its
    shards), an embedding table a QuantizedEmbedding (int8), which a tied LM head then shares.
    Consumes those entries; biases stay parameters, loaded by name as usual."""
    embedding_names = {name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is not None and any(isinstance(m, nn.Embedding) and m.weight is lm_head.weight
                                       for m in model.modules())
    with torch.no_grad():
        for name in sorted(embedding_names):
            weight = packed.pop(f"{name}.weight", None)
            if weight is None:
                continue
            table = weight.as_int8(min(weight.group, 32))
            replace_module(model, name, QuantizedEmbedding(table.q, table.scale, dtype, table.offset, table.group))
            if tied:
                replace_module(model, "lm_head", QuantizedLinear.from_packed(table, None, dtype))
        for module_name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or getattr(module, "transposed_checkpoint", False):
                continue
            parent = module_name.rpartition(".")[0]
            merged = isinstance(module, MergedLinear)
            hf_names = [f"{parent}.{s}.weight" for s in module.shard_names] if merged else [f"{module_name}.weight"]
            if not any(n in packed for n in hf_names):
                continue
            missing = [n for n in hf_names if n not in packed]
            if missing:
                raise ValueError(f"{source}: {hf_names[0]} is quantized but {missing[0]} is not; "
                                 "ember merges them into one projection")
            weight = concat_rows([packed.pop(n) for n in hf_names])
            if weight.shape != (module.out_features, module.in_features):
                raise ValueError(f"{source}: {hf_names[0]} is {list(weight.shape)}, "
                                 f"the model expects [{module.out_features}, {module.in_features}]")
            names = {"shard_names": module.shard_names, "output_sizes": module.output_sizes} if merged else {}
            bias = torch.zeros(module.out_features, dtype=dtype) if module.bias is not None else None
            replace_module(model, module_name, QuantizedLinear.from_packed(weight, bias, dtype, **names))


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    # What LoRA reads off a projection: whether its checkpoint tensor is fused (Phi-3's qkv_proj: adapters name
    # it whole), and how tensor parallel cut it.
    for attribute in ("fused_checkpoint", "tp_split"):
        if getattr(old, attribute, None) is not None:
            setattr(module, attribute, getattr(old, attribute))
    setattr(owner, child, module)


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace the model's linear layers (and optionally its embedding table) in place.

    A tied int8 LM head and embedding table share one int8 matrix, as they shared one before."""
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is not None and any(isinstance(m, nn.Embedding) and m.weight is lm_head.weight
                                       for m in model.modules())
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and (module is not lm_head or config.lm_head):
                replace_module(model, name, QuantizedLinear.quantize(module, config))
        head = getattr(model, "lm_head", None)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Embedding) and config.embeddings and name.endswith("embed_tokens"):
                if tied and isinstance(head, QuantizedLinear) and head.layout == "channels":
                    replace_module(model, name, QuantizedEmbedding(head.qweight, head.scales, head.dtype))
                else:
                    replace_module(model, name, QuantizedEmbedding.quantize(module))
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
