"""GGUF files (llama.cpp's single-file format) as a model source.

A GGUF holds what an HF directory spreads over config.json, tokenizer.json and safetensors:
metadata under llama.cpp's key names and tensors under its names, most of them in quantized
blocks. Read with the `gguf` package (ggml's own reader), it becomes what every source becomes
(DESIGN.md, "Loading is a front door"): a ModelConfig built from an HF-style config dict, the
tokenizer's metadata (`ember/tokenizer_gguf.py` builds the tokenizer) and weights under
transformers' names; quantized blocks are decoded exactly into ember's int4/int8 layouts
(`gguf_blocks.py`) and stay quantized where ember has kernels for them.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ember.models.config import ModelConfig
from ember.models.gguf_blocks import DECODERS, PackedWeight, decode

logger = logging.getLogger(__name__)

SUFFIX = ".gguf"
_SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")

# GGUF architecture -> the HF architecture ember builds (llama with experts is Mixtral).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (what they multiply by); ember keeps w.
_NORM_SHIFTED = {"gemma2", "gemma3"}
# llama.cpp's converter reorders the q and k rows of these (its rotary pairs neighbours; HF's halves).
_PERMUTED_QK = {"llama"}

# GGUF key (under the architecture's prefix) -> HF config.json field.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.layer_norm_epsilon": "layer_norm_eps",
    "rope.freq_base": "rope_theta",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
}
_DENSE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# GGUF expert tensors ([experts, out, in]) -> each expert's HF name under the layer's MoE block.
_EXPERTS = {"mixtral": {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"},
            "qwen2_moe": {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}}


def find_gguf(path: str | Path) -> Path | None:
    """`path` if it is a .gguf file, the one .gguf in a directory without config.json, else None.

    A directory with several .gguf files is an error that lists them (the user picks one)."""
    path = Path(path)
    if path.suffix == SUFFIX:
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.glob(f"*{SUFFIX}") if not p.name.startswith("mmproj"))
    firsts = [p for p in files if not (m := _SPLIT.match(p.name)) or int(m["index"]) == 1]
    if len(firsts) > 1:
        names = ", ".join(p.name for p in firsts)
        raise ValueError(f"model: {str(path)!r} holds several GGUF files ({names}); give one: --model {path}/FILE.gguf")
    return firsts[0] if firsts else None


def _reader_class(fast: bool = True):
    import gguf

    class Reader(gguf.GGUFReader):
        # The reader slices its np.memmap once per metadata item; a plain ndarray over the same mapped
        # bytes skips memmap's per-slice bookkeeping, which dominates reading a large vocabulary (BENCHMARKS.md).
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)

        def _get_field_parts(self, orig_offs, raw_type):
            # Arrays in one pass instead of one reader call per item (slow over a vocabulary of hundreds of
            # thousands of strings; BENCHMARKS.md): numbers as one view, strings as memoryviews.
            # ReaderField.contents() reads both as it reads the reader's own parts. Anything unusual goes
            # to the reader itself.
            if not fast or raw_type != gguf.GGUFValueType.ARRAY or self.byte_order == "S":
                return super()._get_field_parts(orig_offs, raw_type)
            head = [self._plain[orig_offs:orig_offs + 4].view(np.uint32),
                    self._plain[orig_offs + 4:orig_offs + 12].view(np.uint64)]
            item_type, count = gguf.GGUFValueType(int(head[0][0])), int(head[1][0])
            offs = orig_offs + 12
            if item_type == gguf.GGUFValueType.STRING:
                buf, parts, data = memoryview(self._plain), list(head), []
                for _ in range(count):
                    length = int.from_bytes(buf[offs:offs + 8], "little")
                    parts.append(buf[offs:offs + 8])
                    data.append(len(parts))
                    parts.append(buf[offs + 8:offs + 8 + length])
                    offs += 8 + length
                return offs - orig_offs, parts, data, [gguf.GGUFValueType.ARRAY, item_type]
            nptype = self.gguf_scalar_to_np.get(item_type)
            if nptype is None:  # arrays of arrays
                return super()._get_field_parts(orig_offs, raw_type)
            values = self._plain[offs:offs + count * np.dtype(nptype).itemsize].view(nptype)
            return 12 + values.nbytes, head + [values], [2], [gguf.GGUFValueType.ARRAY, item_type]

    return Reader


@dataclass
class _Tensor:
    name: str
    type: str  # GGML type name
    shape: tuple[int, ...]  # torch order ([rows, columns]; experts first)
    data: np.ndarray  # the mapped bytes (quantized) or values (dense)
    file: str


class GGUFFile:
    """A GGUF model (one file, or the parts of a split one), opened once: metadata and tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"model: {str(self.path)!r} does not exist")
        readers = [self._open(p) for p in self._parts()]
        self.metadata: dict[str, Any] = {}
        for name, field in readers[0].fields.items():
            if not name.startswith("GGUF."):
                self.metadata[name] = field
        self.tensors: dict[str, _Tensor] = {}
        for part, reader in zip(self._parts(), readers):
            for t in reader.tensors:
                shape = tuple(int(n) for n in reversed(t.shape.tolist()))
                self.tensors[t.name] = _Tensor(t.name, t.tensor_type.name, shape, t.data, str(part))
        self.arch = str(self.get("general.architecture", ""))
        if not self.arch:
            raise ValueError(f"{self.path}: no general.architecture in the GGUF metadata")

    def _parts(self) -> list[Path]:
        m = _SPLIT.match(self.path.name)
        if not m:
            return [self.path]
        count = int(m["count"])
        parts = [self.path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}{SUFFIX}") for i in range(1, count + 1)]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise ValueError(f"{self.path}: split GGUF is missing part(s) {', '.join(missing)}")
        return parts

    @staticmethod
    def _open(path: Path):
        try:
            try:
                return _reader_class()(str(path))
            except (ValueError, IndexError, KeyError, TypeError):  # (the fast array path is not to blame for
                return _reader_class(fast=False)(str(path))  # a broken file: the plain reader says what is)
        except (ValueError, IndexError, KeyError, OSError, TypeError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "GGMLQuantizationType" in detail:
                detail = f"a tensor has a type this reader does not know ({detail})"
            raise ValueError(f"{path}: not a readable GGUF file ({detail})") from None

    def get(self, key: str, default: Any = None) -> Any:
        field = self.metadata.get(key)
        if field is None:
            return default
        value = field.contents()
        return value

    def arch_key(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    # ---- config -------------------------------------------------------------------------
    def hf_config(self) -> dict[str, Any]:
        """The metadata as the fields of an HF config.json (what ModelConfig.from_hf reads)."""
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                             f"(supported: {', '.join(sorted(ARCHITECTURES))})")
        hf: dict[str, Any] = {}
        for key, field in _CONFIG_KEYS.items():
            value = self.arch_key(key)
            if isinstance(value, list):
                raise ValueError(f"{self.path}: {self.arch}.{key} varies per layer, which ember does not support")
            if value is not None:
                hf[field] = value
        architecture, model_type = ARCHITECTURES[self.arch], self.arch
        if self.arch == "llama" and hf.get("num_experts"):
            architecture, model_type = "MixtralForCausalLM", "mixtral"
            hf["num_local_experts"] = hf.pop("num_experts")
        elif self.arch in ("qwen2moe", "qwen3moe"):
            model_type = self.arch.replace("moe", "_moe")
            hf["norm_topk_prob"] = self.arch == "qwen3moe"  # as llama.cpp routes them
        elif self.arch == "gpt2":
            hf["activation_function"] = "gelu_new"
        elif self.arch in ("gemma2", "gemma3"):
            hf.update(self._gemma(hf))
        hf.update(architectures=[architecture], model_type=model_type)
        embed = self.tensors.get("token_embd.weight")
        hf["vocab_size"] = self.arch_key("vocab_size") or (embed.shape[0] if embed else len(self.get("tokenizer.ggml.tokens", [])))
        hf["tie_word_embeddings"] = "output.weight" not in self.tensors
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
        rotary = self.arch_key("rope.dimension_count")
        if rotary is not None and self.arch != "gpt2" and int(rotary) != head_dim:
            raise ValueError(f"{self.path}: rotary on {rotary} of {head_dim} head dimensions is not supported")
        hf.update(self._rope_scaling())
        file_type = self.get("general.file_type")
        hf["torch_dtype"] = {0: "float32", 1: "float16", 32: "bfloat16"}.get(file_type)  # quantized: None (fp32)
        for field, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            value = self.get(f"tokenizer.ggml.{key}")
            if value is not None:
                hf[field] = int(value)
        return hf

    def _gemma(self, hf: dict[str, Any]) -> dict[str, Any]:
        """Gemma 2/3's fields llama.cpp keeps in code rather than metadata: the local/global layer pattern
        (every 2nd / 6th layer global), the local layers' rope base (10k), the query scale, soft-capping."""
        layers, heads = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
        pattern = self.arch_key("attention.sliding_window_pattern", 2 if self.arch == "gemma2" else 6)
        if isinstance(pattern, list):  # one flag per layer: True = local
            local = [bool(p) for p in pattern]
        else:
            local = [(i + 1) % int(pattern) != 0 for i in range(layers)]
        out = {"hidden_act": "gelu_pytorch_tanh",
               "sliding_window": self.arch_key("attention.sliding_window"),
               "layer_types": ["sliding_attention" if f else "full_attention" for f in local],
               # Gemma 2 27B scales queries by hidden / heads, the others by head_dim (as llama.cpp does)
               "query_pre_attn_scalar": hf["hidden_size"] // heads if self.arch == "gemma2" and layers == 46 else head_dim,
               "attn_logit_softcapping": self.arch_key("attn_logit_softcapping"),
               "final_logit_softcapping": self.arch_key("final_logit_softcapping")}
        if self.arch == "gemma3":
            full = {"rope_type": "default", "rope_theta": hf.get("rope_theta", 1e6), **self._rope_scaling().get("rope_scaling", {})}
            out["rope_parameters"] = {"full_attention": full, "sliding_attention": {
                "rope_type": "default", "rope_theta": float(self.arch_key("rope.freq_base_swa", 10000.0))}}
        return out

    def _rope_scaling(self) -> dict[str, Any]:
        kind = self.arch_key("rope.scaling.type")
        factors = self.tensors.get("rope_freqs.weight")  # Llama 3's frequency factors, precomputed
        if factors is not None:
            return {"rope_scaling": {"rope_type": "default", "freq_factors": [float(f) for f in factors.data]}}
        if kind in (None, "none"):
            return {}
        scaling = {"rope_type": kind, "factor": float(self.arch_key("rope.scaling.factor", 1.0))}
        original = self.arch_key("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return {"rope_scaling": scaling}

    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config(), source=str(self.path))

    # ---- weights ------------------------------------------------------------------------
    def hf_names(self, model: nn.Module, config: ModelConfig) -> dict[str, str]:
        """GGUF tensor name -> the HF name ember's loader knows (experts are mapped separately)."""
        import gguf

        from ember.models.loader import hf_parameter_map

        arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[self.arch]
        names = gguf.get_tensor_name_map(arch, config.num_layers)
        out = {}
        for hf in hf_parameter_map(model):
            name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if name is not None:
                out[name] = hf
        return out

    def unpermute_heads(self, hf_name: str, config: ModelConfig) -> int | None:
        """Heads whose rotary row order to undo for this tensor (None: as stored)."""
        if self.arch not in _PERMUTED_QK:
            return None
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return config.num_heads
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return config.num_kv_heads
        return None


def unpermute_index(rows: int, heads: int) -> torch.Tensor:
    """Row order undoing llama.cpp's q/k permutation: its row h*d + 2b + a is HF's row h*d + a*d/2 + b."""
    return torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime: float, size: int) -> GGUFFile:
    started = time.perf_counter()
    print(f"reading GGUF metadata from {path} ...", file=sys.stderr, flush=True)
    g = GGUFFile(path)
    logger.info("%s: %s, %d tensors, metadata read in %.1f s", Path(path).name, g.arch, len(g.tensors),
                time.perf_counter() - started)
    return g


def open_gguf(path: str | Path) -> GGUFFile:
    """The GGUFFile for `path`, read once per process (config, tokenizer and weights all need it)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"model: {str(path)!r} does not exist")
    stat = path.stat()
    return _open_cached(str(path), stat.st_mtime, stat.st_size)


def tensor_values(t: _Tensor) -> torch.Tensor:
    """A tensor's values as a float tensor in torch order (dequantized where it is quantized)."""
    if t.type in _DENSE:
        data = t.data
        if t.type == "BF16":
            return torch.from_numpy(np.ascontiguousarray(data).view(np.int16).copy()).view(torch.bfloat16).reshape(t.shape)
        return torch.from_numpy(np.array(data, copy=True)).reshape(t.shape)
    if t.type in DECODERS and len(t.shape) == 2:
        return decode(t.type, t.data).dequantize()
    import gguf

    try:
        values = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.type])
    except NotImplementedError:
        raise ValueError(f"{t.file}: tensor {t.name!r} has type {t.type}, which ember cannot read "
                         f"(supported: F32, F16, BF16, {', '.join(DECODERS)}, Q2_K, Q3_K, IQ*)") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(t.shape)


def tensor_packed(t: _Tensor) -> PackedWeight | None:
    """A 2-D tensor in a block format ember maps exactly, as a PackedWeight; None otherwise."""
    if t.type in DECODERS and len(t.shape) == 2:
        return decode(t.type, t.data)
    return None


def _packable(model: nn.Module) -> set[str]:
    """HF names of the weights ember can hold quantized: linear layers' (not GPT-2's transposed ones,
    nor those inside a block that maps its own names, as MoE does) and embedding tables'."""
    from ember.models.layers import MergedLinear

    names, own_names = set(), []
    for module_name, module in model.named_modules():
        if any(module_name.startswith(prefix) for prefix in own_names):
            continue
        if hasattr(module, "hf_parameters"):
            own_names.append(f"{module_name}.")
        elif isinstance(module, nn.Embedding):
            names.add(f"{module_name}.weight")
        elif isinstance(module, MergedLinear):
            parent = module_name.rpartition(".")[0]
            names.update(f"{parent}.{shard}.weight" for shard in module.shard_names)
        elif isinstance(module, nn.Linear) and not getattr(module, "transposed_checkpoint", False):
            names.add(f"{module_name}.weight")
    return names


def _expert_names(config: ModelConfig) -> tuple[str, dict[str, str]] | None:
    """(HF name template of one expert's weight, GGUF tensor kind -> HF projection) for MoE models."""
    if config.family.moe == "mixtral":
        return "model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight", _EXPERTS["mixtral"]
    if config.family.moe in ("qwen2_moe", "qwen3_moe"):
        return "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", _EXPERTS["qwen2_moe"]
    return None


_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.(ffn_(?:gate|up|down)_exps)\.weight$")


def load_gguf(path: Path, dtype: str | torch.dtype, device: torch.device,
              splitter=None) -> tuple[nn.Module, ModelConfig]:
    """The model of a GGUF file: quantized blocks ember maps exactly stay quantized on CPU (4-bit ones
    always, 5-8-bit ones where ember's integer kernels run); everything else is dequantized to the
    compute dtype (as transformers does), experts and GPT-2's transposed projections included.
    `splitter` (tensor parallel, ember.models.tensor_parallel.GGUFSplitter) builds the model already split
    and cuts each tensor to the rank's piece as it is read; a packed weight it cannot cut is dequantized."""
    from collections import Counter

    from ember.models import cpu_ops
    from ember.models.loader import empty_model, load_weights, progress
    from ember.models.quant import install_packed

    started = time.perf_counter()
    g = open_gguf(path)
    config = g.config()
    torch_dtype = config.resolve_dtype(dtype, device)
    model = empty_model(config, torch_dtype, device) if splitter is None else splitter.build(config, torch_dtype, device)
    names, packable, experts = g.hf_names(model, config), _packable(model), _expert_names(config)
    transposed = {n for n, (p, _) in _parameter_map(model).items() if getattr(p, "transposed_checkpoint", False)}
    packed: dict[str, PackedWeight] = {}
    dense, unexpected, kept, dequantized = [], [], Counter(), Counter()
    with progress(f"loading {g.path.name}", unit="tensor", total=len(g.tensors)) as bar:
        for t in g.tensors.values():
            bar.update()
            hf = names.get(t.name)
            if hf is None:
                m = _EXPERT_TENSOR.match(t.name)
                if m and experts:
                    template, projections = experts
                    values = tensor_values(t).to(torch_dtype)
                    dense.extend((template.format(layer=m[1], expert=e, proj=projections[m[2]]), values[e], t.file)
                                 for e in range(values.shape[0]))
                    if t.type not in _DENSE:
                        dequantized[t.type] += 1
                elif t.name != "rope_freqs.weight":  # (read into the config)
                    unexpected.append(t.name)
                continue
            heads = g.unpermute_heads(hf, config)
            weight = tensor_packed(t) if device.type == "cpu" and hf in packable else None
            if weight is not None and (weight.bits == 4 or cpu_ops.int_kernels_available()):
                weight = weight.rows(unpermute_index(weight.shape[0], heads)) if heads else weight
                if splitter is not None:
                    weight = splitter.packed(hf, weight)
                if weight is not None:
                    packed[hf] = weight
                    kept[t.type] += 1
                    continue
            values = tensor_values(t)
            if heads:
                values = values[unpermute_index(values.shape[0], heads)]
            if g.arch in _NORM_SHIFTED and hf.endswith("norm.weight"):
                values = values - 1
            dense.append((hf, values.t() if hf in transposed else values, t.file))
            if t.type not in _DENSE:
                dequantized[t.type] += 1
    if unexpected:
        logger.warning("%s: ignored %d tensors ember's %s has no place for, e.g. %s", g.path.name, len(unexpected),
                       config.architecture, unexpected[:3])
    install_packed(model, packed, torch_dtype, str(g.path))
    load_weights(model, dense if splitter is None else splitter.dense(dense))
    model.eval()
    summary = ", ".join(f"{n} {kind}" for kind, n in kept.items()) or "none"
    print(f"loaded {g.path.name} in {time.perf_counter() - started:.1f} s ({g.arch}; kept quantized: {summary}"
          + (f"; dequantized to {str(torch_dtype).removeprefix('torch.')}: "
             + ", ".join(f"{n} {kind}" for kind, n in dequantized.items()) if dequantized else "") + ")",
          file=sys.stderr, flush=True)
    return model, config


def _parameter_map(model: nn.Module):
    from ember.models.loader import hf_parameter_map

    return hf_parameter_map(model)
