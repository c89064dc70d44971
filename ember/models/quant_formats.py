"""Pre-quantized checkpoints: GPTQ and AWQ safetensors onto ember's quantized linears.

Both store, per linear layer, `qweight` (int32 words of packed 4- or 8-bit values),
`qzeros` (packed zero points), `scales` (fp16, [groups, out]) and GPTQ also
`g_idx` (the group of each input channel). The layouts:
- GPTQ: `qweight` [in * bits / 32, out], values packed along the input dim, lowest
  bits first; `qzeros` [groups, out * bits / 32] packed along the output dim; the
  stored zero is zero - 1 ("checkpoint_format": "gptq", AutoGPTQ's v1), or the zero
  itself ("gptq_v2"). With act-order (`desc_act`) `g_idx` is a permutation of groups.
- AWQ (version "gemm"): `qweight` [in, out * bits / 32] and `qzeros` [groups, out * bits / 32],
  both packed along the output dim in the order 0 2 4 6 1 3 5 7.
Dequantized: w[out, in] = (q - zero) * scale of the input channel's group.

`ember quantize` writes GPTQ (v1) so its output loads here and in the peers that read GPTQ.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ember.models.layers import MergedLinear
from ember.models.quant import (GROUP_SIZES, QuantConfig, QuantizedLinear, quantize_int4, quantize_int8,
                                replace_module)

QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
_AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds output channel 8 * word + _AWQ_ORDER[i]
_AWQ_UNDO = [_AWQ_ORDER.index(i) for i in range(8)]  # the nibble holding output channel 8 * word + i
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


@dataclass(frozen=True)
class CheckpointQuant:
    method: str  # gptq | awq
    bits: int
    group_size: int  # -1: one group per output channel
    zero_offset: int  # added to stored zeros (1 for GPTQ v1)


def checkpoint_quantization(raw_config: dict, source: str) -> CheckpointQuant | None:
    """`quantization_config` of config.json -> what the loader needs; a clear error for other formats."""
    qc = raw_config.get("quantization_config")
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "mxfp4" and raw_config.get("model_type") == "gpt_oss":
        return None  # gpt-oss's MXFP4 experts: dequantized as they load (loader.py)
    bits, group_size = int(qc.get("bits", qc.get("w_bit", 0))), int(qc.get("group_size", qc.get("q_group_size", -1)))
    if method == "gptq":
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        if bits not in (4, 8):
            raise ValueError(f"{source}: GPTQ bits={bits} is not supported (4 or 8)")
        return CheckpointQuant("gptq", bits, group_size, 1 if fmt == "gptq" else 0)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or bits != 4:
            raise ValueError(f"{source}: AWQ version={version!r} bits={bits} is not supported (gemm, 4 bits)")
        if not qc.get("zero_point", True):
            raise ValueError(f"{source}: AWQ without zero points is not supported")
        return CheckpointQuant("awq", bits, group_size, 0)
    raise ValueError(f"{source}: quantization_config.quant_method={method!r} is not supported (gptq, awq); "
                     "ember quantizes float checkpoints itself with quantization='int8' or 'int4'")


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their 32/bits values, lowest bits first, laid out along `dim`."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., words, per]
    if dim == 0:  # packed along rows: [rows, per, cols] -> [rows * per, cols]
        return values.permute(0, 2, 1).reshape(-1, words.shape[1])
    return values.reshape(words.shape[0], -1)


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per = 32 // bits
    v = values.to(torch.int64)
    v = v.reshape(-1, per, v.shape[1]).permute(0, 2, 1) if dim == 0 else v.reshape(v.shape[0], -1, per)
    words = (v << torch.arange(0, 32, bits, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@dataclass
class _Unpacked:
    q: torch.Tensor  # [out, in] int32, input channels in group order
    zero: torch.Tensor  # [groups, out]
    scale: torch.Tensor  # [groups, out]
    perm: torch.Tensor | None  # act-order: the checkpoint input channel of each column of q


def _unpack_layer(fmt: CheckpointQuant, t: dict[str, torch.Tensor], name: str) -> _Unpacked:
    scale = t["scales"].float()
    if fmt.method == "awq":
        q = _unpack(t["qweight"], 4, 1)[:, _undo_awq(t["qweight"].shape[1])].t()
        zero = _unpack(t["qzeros"], 4, 1)[:, _undo_awq(t["qzeros"].shape[1])]
        return _Unpacked(q.contiguous(), zero, scale, None)
    q = _unpack(t["qweight"], fmt.bits, 0).t().contiguous()
    zero = _unpack(t["qzeros"], fmt.bits, 1)[:, : q.shape[0]] + fmt.zero_offset
    in_features, groups = q.shape[1], scale.shape[0]
    perm = None
    g_idx = t.get("g_idx")
    if g_idx is not None and groups > 1:
        default = torch.arange(in_features) // (in_features // groups)
        if not torch.equal(g_idx.long(), default):
            perm = torch.argsort(g_idx.long(), stable=True)
            if not torch.equal(g_idx.long()[perm], default):
                raise ValueError(f"{name}.g_idx: groups are not all of size {in_features // groups}")
            q = q[:, perm].contiguous()
    return _Unpacked(q, zero, scale, perm)


def _undo_awq(words: int) -> torch.Tensor:
    return (torch.arange(words)[:, None] * 8 + torch.tensor(_AWQ_UNDO)).reshape(-1)


def _to_module(fmt: CheckpointQuant, parts: list[_Unpacked], name: str, dtype: torch.dtype,
               names: dict) -> QuantizedLinear:
    if any((p.perm is None) != (parts[0].perm is None) or (p.perm is not None and not torch.equal(p.perm, parts[0].perm))
           for p in parts):
        raise ValueError(f"{name}: merged projections with different act-order permutations are not supported")
    q = torch.cat([p.q for p in parts])
    zero = torch.cat([p.zero for p in parts], dim=1)
    scale = torch.cat([p.scale for p in parts], dim=1)
    in_features, groups = q.shape[1], scale.shape[0]
    if fmt.bits == 8:
        if groups != 1 or not bool((zero == 128).all()):
            raise ValueError(f"{name}: 8-bit checkpoints must be symmetric with one group per channel "
                             f"(group_size -1, sym true); got {groups} groups")
        module = QuantizedLinear.from_int8(q - 128, scale[0], None, dtype, **names)
    else:
        group_size = in_features // groups
        kernel_group = next((g for g in reversed(GROUP_SIZES) if group_size % g == 0 and in_features % g == 0), None)
        if kernel_group is None:
            raise ValueError(f"{name}: group_size {group_size} is not a multiple of one of {GROUP_SIZES}")
        repeat = group_size // kernel_group  # e.g. per-channel scales become equal scales for every group
        module = QuantizedLinear.from_int4(q, scale.repeat_interleave(repeat, 0), zero.repeat_interleave(repeat, 0),
                                           kernel_group, None, dtype, **names)
    module.perm = parts[0].perm
    return module


def load_quantized_linears(model: nn.Module, tensors, fmt: CheckpointQuant,
                           dtype: torch.dtype, source: str, cut=None) -> None:
    """Replace every linear whose HF tensors are quantized; consumes those tensors (`tensors`: a dict, or a
    loader.LazyTensors that reads each when taken). `cut(module, parts, name)`
    (tensor parallel) returns the rank's pieces of a projection's unpacked parts, for its split module."""
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        parent = module_name.rpartition(".")[0]
        merged = isinstance(module, MergedLinear) and not module.fused_checkpoint  # (Phi-3's are one tensor)
        hf_names = [f"{parent}.{s}" for s in module.shard_names] if merged else [module_name]
        if f"{hf_names[0]}.qweight" not in tensors:
            continue
        parts = []
        for hf in hf_names:
            layer = {s[1:]: tensors.pop(hf + s) for s in QUANTIZED_SUFFIXES if hf + s in tensors}
            if {"qweight", "qzeros", "scales"} - set(layer):
                raise ValueError(f"{source}: {hf} lacks {sorted({'qweight', 'qzeros', 'scales'} - set(layer))}")
            parts.append(_unpack_layer(fmt, layer, hf))
        if cut is not None:
            parts = cut(module, parts, hf_names[0])
        names = {"shard_names": module.shard_names, "output_sizes": module.output_sizes} \
            if isinstance(module, MergedLinear) else {}
        quantized = _to_module(fmt, parts, hf_names[0], dtype, names)
        if quantized.out_features != module.out_features or quantized.in_features != module.in_features:
            raise ValueError(f"{source}: {hf_names[0]} is [{quantized.out_features}, {quantized.in_features}] "
                             f"once unpacked, the model expects [{module.out_features}, {module.in_features}]")
        if module.bias is not None:
            quantized.bias = nn.Parameter(torch.zeros(module.out_features, dtype=dtype), requires_grad=False)
        replace_module(model, module_name, quantized)
    leftover = sorted(n for n in tensors if n.endswith(QUANTIZED_SUFFIXES))
    if leftover:
        raise ValueError(f"{source}: quantized tensors for no linear layer of the model, e.g. {leftover[:3]}")


def gptq_tensors(weight: torch.Tensor, config: QuantConfig) -> dict[str, torch.Tensor]:
    """One float [out, in] weight -> GPTQ v1 tensors (int8: symmetric per channel; int4: per group)."""
    out_features, in_features = weight.shape
    if config.method == "int8":
        q, scale = quantize_int8(weight)
        bits, stored, zero = 8, (q.to(torch.int32) + 128), torch.full((1, out_features), 128, dtype=torch.int32)
        scale = scale[None]
    else:
        bits, group_size = 4, config.group_size
        stored, scale, zero = quantize_int4(weight, group_size, min_zero=1)
    groups = scale.shape[0]
    return {
        "qweight": _pack(stored.t().contiguous(), bits, 0),
        "qzeros": _pack(zero - 1, bits, 1),
        "scales": scale.to(torch.float16),
        "g_idx": (torch.arange(in_features) // (in_features // groups)).to(torch.int32),
    }


def save_quantized(model: nn.Module, model_dir: Path, out_dir: Path, config: QuantConfig) -> None:
    """Write `model` (float, HF names) as a GPTQ checkpoint in `out_dir`, with the tokenizer files."""
    from ember.models.loader import hf_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    quantizable = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not getattr(model, "lm_head", None):
            parent = module_name.rpartition(".")[0]
            shards = (zip(module.shard_names, module.output_sizes) if isinstance(module, MergedLinear)
                      else [(module_name.rpartition(".")[2], module.out_features)])
            start = 0
            for shard, size in shards:
                quantizable[f"{parent}.{shard}.weight"] = module.weight.detach()[start:start + size]
                start += size
    tensors = {}
    for name, tensor in hf_state_dict(model).items():
        if name in quantizable:
            prefix = name.removesuffix(".weight")
            if config.method == "int4" and tensor.shape[1] % config.group_size:
                raise ValueError(f"quantization_group_size: {config.group_size} does not divide {prefix}'s "
                                 f"{tensor.shape[1]} input channels")
            for suffix, t in gptq_tensors(quantizable[name], config).items():
                tensors[f"{prefix}.{suffix}"] = t.contiguous()
        else:
            tensors[name] = tensor.detach().to(torch.bfloat16 if tensor.is_floating_point() else tensor.dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    raw = json.loads((model_dir / "config.json").read_text())
    raw["torch_dtype"] = "bfloat16"
    raw["quantization_config"] = {
        "quant_method": "gptq", "bits": 8 if config.method == "int8" else 4,
        "group_size": -1 if config.method == "int8" else config.group_size,
        "desc_act": False, "sym": config.method == "int8", "checkpoint_format": "gptq",
    }
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out_dir / name)
