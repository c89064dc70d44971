"""Tensor parallelism for the decoder stack: Megatron's split of a loaded model across a process group.

Each rank keeps 1/N of every layer and the ranks sum their partial results once per sublayer:
- attention: q/k/v projections by head (column-parallel), o_proj by its input columns (row-parallel),
  then one all-reduce; a rank attends over its own heads with its own share of the KV cache;
- gated MLP: gate/up by channel (column), down by input column (row), one all-reduce;
- MoE: the router replicated, every expert (and Qwen2-MoE's shared expert) split like the MLP, one
  all-reduce after the whole block (the routing weights scale each expert's partial sum linearly); gpt-oss's
  interleaved gate|up by channel too, its sinks by head;
- q/k norms over the whole projection (OLMo 2): each rank's sum of squares all-reduced (SplitRMSNorm);
- embeddings and the LM head by vocabulary: a rank looks up only its ids (the others' rows sum in as
  zeros) and computes only its logits, gathered into the whole row. Ranks whose vocabulary slice would
  be ragged pad it with zero rows, cut off after the gather.

Biases of row-parallel projections live on rank 0 only (summed in once). Every rank runs the same
forward on the same inputs, so each ends a layer with the same whole hidden state. `shard_model` does
the split in place on a model that was loaded whole, and returns the rank's view of the config (its
heads and channels), which sizes its KV cache.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ember.models.config import ModelConfig
from ember.models.layers import DecoderLayer, GatedMLP, Linear, MergedLinear


@dataclasses.dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    size: int
    # A ProcessGroup of the ranks' own, called directly (not registered with torch.distributed, so the
    # process's default group stays free: a trainer's, or another engine's); None: the default group.
    group: object = None
    shm: object = None  # ranks on one machine: a SharedMemoryComm for the tensors that fit its slots

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_reduce(x)
        if self.group is None:
            dist.all_reduce(x)
        else:
            self.group.allreduce([x]).wait()
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_gather_last(x)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        if self.group is None:
            dist.all_gather(parts, x.contiguous())
        else:
            self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=-1)


@dataclasses.dataclass(frozen=True)
class SplitRecord:
    """How a projection was cut, kept on it as `tp_split` for what must later be cut the same way (LoRA
    weights): "column" (its rows, part by part: `kv_parts` by KV head, the others evenly) or "row" (its
    input columns); `in_features` and `sizes` are the whole projection's."""

    kind: str
    tp: TensorParallelGroup
    in_features: int
    sizes: tuple[int, ...]
    kv_parts: tuple[int, ...] = ()
    head_dim: int = 0
    num_kv_heads: int = 0

    def cut_rows(self, part: int | None, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of part `part` (whole rows in, e.g. a LoRA B of q_proj), or with `part` None of
        every part of the whole projection's rows (a fused checkpoint's q|k|v)."""
        if part is None:
            return torch.cat([self.cut_rows(i, piece) for i, piece in enumerate(t.split(self.sizes, 0))])
        if part in self.kv_parts:
            return _kv_piece(t, self.head_dim, self.num_kv_heads, self.tp)
        return _piece(t, 0, self.tp)


def lora_piece(module: nn.Module, shard: int, a: torch.Tensor, b: torch.Tensor, num_shards: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A [r, in], B [out, r]) of an adapter on shard `shard` of `module` (one of `num_shards`
    row blocks as LoRA sees it): a column-parallel projection keeps A whole and B's rows of its heads or
    channels; a row-parallel one keeps A's columns of its inputs and B whole (the all-reduce after the
    projection sums the ranks' partial B (A x), as it does their base products). Whole where not split."""
    record: SplitRecord | None = getattr(module, "tp_split", None)
    if record is None:
        return a, b
    if record.kind == "row":
        return _piece(a, 1, record.tp), b
    fused = num_shards == 1 and len(record.sizes) > 1  # one adapter on a fused checkpoint's qkv / gate_up rows
    return a, record.cut_rows(None if fused else shard, b)


def check_shardable(config: ModelConfig, size: int) -> None:
    """Raise ValueError naming what keeps `config` from splitting `size` ways."""
    if size == 1:
        return
    family = config.family
    kv = config.num_kv_heads
    if family.qk_norm == "full" and kv % size:
        raise ValueError(f"tensor_parallel_size: {size}: {config.architecture} normalises k over all its KV heads "
                         f"at once, which needs them split evenly ({kv} KV heads; a shared, replicated head would "
                         "count twice)")
    if kv % size and size % kv:
        raise ValueError(f"tensor_parallel_size: {size} neither divides the model's num_key_value_heads ({kv}) "
                         "nor is a multiple of it (each rank needs whole KV heads, or one shared with others)")
    widths = {"num_attention_heads": config.num_heads, "intermediate_size": config.intermediate_size}
    raw = config.raw
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if raw.get(key):
            widths[key] = int(raw[key])
    for name, value in widths.items():
        if value % size:
            raise ValueError(f"tensor_parallel_size: {size} does not divide the model's {name} ({value})")


def shard_model(model: nn.Module, tp: TensorParallelGroup, quant=None) -> ModelConfig:
    """Split `model` (an ember decoder, loaded whole) in place to rank `tp.rank`'s share, then quantize the
    pieces if `quant` (a QuantConfig: each rank quantizes its own pieces, so a row-parallel projection's
    per-channel scales cover the rank's input columns; the vocabulary-parallel embedding stays unquantized);
    returns the config as the rank sees it (its heads and MLP width)."""
    local = _split(model, tp)
    _finish(model, tp, quant)
    return local


def load_model_shard(model_dir, dtype, device: torch.device, tp: TensorParallelGroup, quant=None):
    """(model, rank config): rank `tp.rank`'s share of the checkpoint, built on the meta device, split there,
    and filled from the safetensors files piece by piece, so a rank never holds more than its share (plus one
    checkpoint tensor at a time); GGUF files too, their quantized blocks cut in their packed form, and GPTQ/AWQ
    projections cut once unpacked (a rank holds one whole projection at a time). Multimodal checkpoints and
    gpt-oss load whole, then split."""
    from pathlib import Path

    from ember.models.gguf import find_gguf
    from ember.models.loader import LazyTensors, iter_safetensors, load_model, load_weights, safetensors_files
    from ember.models.quant_formats import QUANTIZED_SUFFIXES, checkpoint_quantization, load_quantized_linears

    if (gguf_file := find_gguf(model_dir)) is not None:
        from ember.models.gguf import load_gguf

        splitter = GGUFSplitter(tp)
        model, _ = load_gguf(gguf_file, dtype, device, splitter)
        _finish(model, tp, quant)
        return model, splitter.local
    config = ModelConfig.from_dir(model_dir)
    if config.family.text_tower or config.family.moe == "gpt_oss":
        model, _ = load_model(model_dir, dtype, device)
        return model, shard_model(model, tp, quant)
    torch_dtype = config.resolve_dtype(dtype, device)
    model, local = _build_split(config, torch_dtype, device, tp)
    files = safetensors_files(Path(model_dir))
    fmt = checkpoint_quantization(config.raw, str(Path(model_dir) / "config.json"))
    if fmt is not None:  # GPTQ / AWQ: each projection read, unpacked, cut and packed for this rank in turn
        packed = LazyTensors(files, keep=lambda name: name.endswith(QUANTIZED_SUFFIXES))
        load_quantized_linears(model, packed, fmt, torch_dtype, str(model_dir), cut=_cut_unpacked)
        model.to(device)
    dense = (lambda name: not name.endswith(QUANTIZED_SUFFIXES)) if fmt is not None else None
    whole = ((name, tensor) for name, tensor, _ in iter_safetensors(files, Path(model_dir).name, keep=dense))
    load_weights(model, ((name, piece, "checkpoint") for name, piece in shard_hf_tensors(model, tp, whole)))
    model.eval()
    _finish(model, tp, quant)
    return model, local


def _cut_unpacked(module: nn.Module, parts: list, name: str) -> list:
    """A GPTQ/AWQ projection's unpacked parts (q [out, in], scale and zero [groups, out], one per HF module of a
    merged projection) cut as `module` was: output rows for column-parallel, whole groups of input columns for
    row-parallel."""
    record: SplitRecord | None = getattr(module, "tp_split", None)
    if record is None:
        return parts
    if record.kind == "column":
        fused = len(parts) == 1 and len(record.sizes) > 1  # (Phi-3's q|k|v in one checkpoint tensor)
        return [dataclasses.replace(p, q=record.cut_rows(part, p.q), scale=record.cut_rows(part, p.scale.t()).t(),
                                    zero=record.cut_rows(part, p.zero.t()).t())
                for part, p in zip([None] if fused else range(len(parts)), parts)]
    tp, (part,) = record.tp, parts
    if part.perm is not None:
        raise ValueError(f"tensor_parallel_size: {tp.size}: {name} is act-order (desc_act) GPTQ, whose input "
                         "channels are permuted across the whole row; it cannot be cut by input column (use a "
                         "desc_act=false checkpoint)")
    groups = part.scale.shape[0]
    if groups > 1 and groups % tp.size:
        raise ValueError(f"tensor_parallel_size: {tp.size} does not divide the {groups} quantization groups of "
                         f"{name}'s input")
    if groups == 1:  # one scale per output channel: the same for every rank's columns
        return [dataclasses.replace(part, q=_piece(part.q, 1, tp))]
    return [dataclasses.replace(part, q=_piece(part.q, 1, tp), scale=_piece(part.scale, 0, tp),
                                zero=_piece(part.zero, 0, tp))]


def _build_split(config: ModelConfig, dtype: torch.dtype, device: torch.device, tp: TensorParallelGroup):
    """(the model with storage for this rank's pieces only, uninitialised; the rank's config)."""
    from ember.models import model_class

    with torch.device("meta"):
        model = model_class(config.architecture)(config).to(dtype)
    local = _split(model, tp)
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty() unties shared tensors
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, local


_KV_NAMES = (".k_proj.weight", ".k_proj.bias", ".v_proj.weight", ".v_proj.bias")  # (not Phi-3's ".qkv_proj.")


class GGUFSplitter:
    """load_gguf's hooks for tensor parallel: the model built split, each tensor cut as it is read. Packed
    (quantized) weights are cut in their blocks' form: rows for column-parallel projections, whole groups of
    input columns for row-parallel ones; the embedding is dequantized (it is vocabulary-parallel, dense)."""

    COLUMN = (".q_proj.weight", ".gate_proj.weight", ".up_proj.weight")
    ROW = (".o_proj.weight", ".down_proj.weight")

    def __init__(self, tp: TensorParallelGroup):
        self.tp, self.local = tp, None

    def build(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
        self.model, self.local = _build_split(config, dtype, device, self.tp)
        return self.model

    def packed(self, name: str, weight):
        """This rank's piece of a packed weight, or None to take the tensor dequantized (dense)."""
        tp, (n, k) = self.tp, weight.shape
        if name.endswith(_KV_NAMES):
            config = self.model.config
            first, count = kv_heads_of_rank(config.num_kv_heads, tp)
            return weight.rows(slice(first * config.head_dim, (first + count) * config.head_dim))
        if name.endswith(self.COLUMN):
            rows = n // tp.size
            return weight.rows(slice(tp.rank * rows, (tp.rank + 1) * rows))
        if name.endswith(self.ROW) and (k // tp.size) % weight.group == 0:
            from ember.models.gguf_blocks import PackedWeight

            cols, groups = k // tp.size, k // tp.size // weight.group
            pick = slice(tp.rank * groups, (tp.rank + 1) * groups)
            return PackedWeight(weight.q[:, tp.rank * cols:(tp.rank + 1) * cols].contiguous(),
                                weight.scale[:, pick].contiguous(),
                                None if weight.offset is None else weight.offset[:, pick].contiguous(),
                                weight.group, weight.bits)
        if name == "lm_head.weight":
            per_rank = -(-n // tp.size)
            start, end = min(tp.rank * per_rank, n), min((tp.rank + 1) * per_rank, n)
            piece = weight.rows(slice(start, end))
            pad = per_rank - (end - start)
            if pad:
                from ember.models.gguf_blocks import PackedWeight

                def grow(t):
                    return None if t is None else torch.cat((t, t.new_zeros(pad, *t.shape[1:])))

                piece = PackedWeight(grow(piece.q), grow(piece.scale), grow(piece.offset), piece.group, piece.bits)
            return piece
        return None  # the embedding, and anything else: dense, cut by shard_hf_tensors

    def dense(self, items):
        """(HF name, whole tensor, source) -> (name, this rank's piece, source)."""
        items = list(items)
        sources = {name: source for name, _, source in items}
        pieces = shard_hf_tensors(self.model, self.tp, ((name, t) for name, t, _ in items))
        return [(name, piece, sources[name]) for name, piece in pieces]


def _split(model: nn.Module, tp: TensorParallelGroup) -> ModelConfig:
    from ember.models.llama import LlamaForCausalLM
    from ember.models.moe import GptOssMoE, MoE

    config: ModelConfig = getattr(model, "config", None)
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"tensor_parallel_size: {tp.size}: {type(model).__name__} models are not split yet")
    check_shardable(config, tp.size)
    for layer in model.model.layers:
        attn, ffn = layer.self_attn, getattr(layer, layer.ffn_name)
        projections = [attn.qkv_proj, attn.o_proj] + ([ffn.gate_up_proj, ffn.down_proj] if isinstance(ffn, GatedMLP) else [])
        if not isinstance(ffn, (GatedMLP, MoE, GptOssMoE)) or any(type(p) not in (Linear, MergedLinear)
                                                                  for p in projections):
            raise ValueError(f"tensor_parallel_size: {tp.size}: this model's quantized projections were loaded whole "
                             "and are not split (a multimodal GPTQ/AWQ checkpoint); load bf16 weights "
                             "(quantization= at load time if wanted) or a GGUF")
    for layer in model.model.layers:
        _shard_layer(layer, tp)
    _shard_vocabulary(model, tp)
    return dataclasses.replace(config, num_heads=config.num_heads // tp.size,
                               num_kv_heads=kv_heads_of_rank(config.num_kv_heads, tp)[1],
                               intermediate_size=config.intermediate_size // tp.size)


def _finish(model: nn.Module, tp: TensorParallelGroup, quant) -> None:
    if quant is not None:
        from ember.models.quant import quantize_model

        quantize_model(model, dataclasses.replace(quant, embeddings=False))
    _install_collectives(model, tp)
    model.tp_group = tp  # for shard_hf_tensors when weights are pushed


def _piece(t: torch.Tensor, dim: int, tp: TensorParallelGroup) -> torch.Tensor:
    size = t.shape[dim] // tp.size
    return t.narrow(dim, tp.rank * size, size)


def _set(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        module.register_parameter(name, None)
    else:
        setattr(module, name, nn.Parameter(value.contiguous().clone(), requires_grad=False))


def kv_heads_of_rank(num_kv_heads: int, tp: TensorParallelGroup) -> tuple[int, int]:
    """(first KV head, count) this rank holds: its 1/N of them, or with fewer KV heads than ranks the one it
    shares with N / num_kv_heads - 1 other ranks (their query heads all read it; vLLM replicates the same way)."""
    if num_kv_heads >= tp.size:
        per_rank = num_kv_heads // tp.size
        return tp.rank * per_rank, per_rank
    return tp.rank // (tp.size // num_kv_heads), 1


def _kv_piece(t: torch.Tensor, head_dim: int, num_kv_heads: int, tp: TensorParallelGroup) -> torch.Tensor:
    first, count = kv_heads_of_rank(num_kv_heads, tp)
    return t.narrow(0, first * head_dim, count * head_dim)


def _qkv(attn, tp: TensorParallelGroup) -> None:
    """q by head; k and v by KV head (kv_heads_of_rank)."""
    linear, d, kv = attn.qkv_proj, attn.head_dim, attn.num_kv_heads
    record = linear.tp_split = SplitRecord("column", tp, linear.in_features, tuple(linear.output_sizes), (1, 2), d, kv)
    _set(linear, "weight", record.cut_rows(None, linear.weight))
    if linear.bias is not None:
        _set(linear, "bias", record.cut_rows(None, linear.bias))
    local_kv = kv_heads_of_rank(kv, tp)[1]
    linear.output_sizes = [linear.output_sizes[0] // tp.size, local_kv * d, local_kv * d]
    linear.out_features = sum(linear.output_sizes)
    attn.num_heads //= tp.size
    attn.num_kv_heads = local_kv
    attn.split_sizes = list(linear.output_sizes)


def _column(linear: MergedLinear, tp: TensorParallelGroup) -> None:
    """Keep this rank's rows of each merged part (q, k, v; or gate, up)."""
    sizes = linear.output_sizes
    record = linear.tp_split = SplitRecord("column", tp, linear.in_features, tuple(sizes))
    _set(linear, "weight", record.cut_rows(None, linear.weight))
    if linear.bias is not None:
        _set(linear, "bias", record.cut_rows(None, linear.bias))
    linear.output_sizes = [s // tp.size for s in sizes]
    linear.out_features = sum(linear.output_sizes)


def _row(linear: Linear, tp: TensorParallelGroup) -> None:
    """Keep this rank's input columns; the bias on rank 0 only (the all-reduce adds it once)."""
    linear.tp_split = SplitRecord("row", tp, linear.in_features, (linear.out_features,))
    _set(linear, "weight", _piece(linear.weight, 1, tp))
    linear.in_features //= tp.size
    if linear.bias is not None and tp.rank != 0:
        _set(linear, "bias", None)


def _reduce_after(module: nn.Module, tp: TensorParallelGroup) -> None:
    """Sum `module`'s output over the group. Set on the instance: DecoderLayer and Attention call their
    submodules' `forward` directly, so a hook would never run."""
    local = module.forward

    def forward(*args, **kwargs):
        return tp.all_reduce(local(*args, **kwargs))

    module.forward = forward


def _shard_mlp(mlp: GatedMLP, tp: TensorParallelGroup) -> None:
    _column(mlp.gate_up_proj, tp)
    _row(mlp.down_proj, tp)


class SplitRMSNorm(nn.Module):
    """RMSNorm over a vector whose pieces are on different ranks (OLMo 2's q and k norms span every head): each
    rank's sum of squares is summed over the group (a [rows, 1] all-reduce), then each normalises its piece."""

    def __init__(self, norm: nn.Module, tp: TensorParallelGroup):
        super().__init__()
        self.size, self.eps, self.tp = norm.weight.shape[0], norm.eps, tp
        _set(self, "weight", _piece(norm.weight, 0, tp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # fp32 statistics and product, as transformers' Olmo2RMSNorm
        squares = self.tp.all_reduce(xf.pow(2).sum(-1, keepdim=True))
        return (self.weight.float() * (xf * torch.rsqrt(squares / self.size + self.eps))).to(x.dtype)


def _shard_layer(layer: DecoderLayer, tp: TensorParallelGroup) -> None:
    attn = layer.self_attn
    if attn.qk_norm == "full":  # (before _qkv changes the head counts)
        attn.q_norm, attn.k_norm = SplitRMSNorm(attn.q_norm, tp), SplitRMSNorm(attn.k_norm, tp)
    if attn.sinks is not None:  # gpt-oss: one sink logit per head
        _set(attn, "sinks", _piece(attn.sinks, 0, tp))
    _qkv(attn, tp)
    _row(attn.o_proj, tp)
    ffn = getattr(layer, layer.ffn_name)
    if isinstance(ffn, GatedMLP):
        _shard_mlp(ffn, tp)
        return
    if hasattr(ffn, "experts") and hasattr(ffn.experts, "gate_up_proj"):  # gpt-oss
        # gate and up interleave by channel (columns 2j, 2j + 1), so a channel range is a column range
        e = ffn.experts
        _set(e, "gate_up_proj", _piece(e.gate_up_proj, 2, tp))
        _set(e, "gate_up_proj_bias", _piece(e.gate_up_proj_bias, 1, tp))
        _set(e, "down_proj", _piece(e.down_proj, 1, tp))
        ffn.add_down_bias = tp.rank == 0  # the block's all-reduce adds it once
        return
    # MoE (Mixtral, Qwen2/3-MoE): the router stays whole; experts split by channel, as the MLP is
    inter = ffn.intermediate
    gate, up = ffn.w13.split(inter, 1)
    _set(ffn, "w13", torch.cat((_piece(gate, 1, tp), _piece(up, 1, tp)), 1))
    _set(ffn, "w2", _piece(ffn.w2, 2, tp))
    ffn.intermediate = inter // tp.size
    if ffn.shared_expert is not None:
        _shard_mlp(ffn.shared_expert, tp)


def _install_collectives(model: nn.Module, tp: TensorParallelGroup) -> None:
    """The all-reduces after each row-parallel sublayer and the LM head's gather, on the final modules (after
    any quantization has replaced the Linears)."""
    for layer in model.model.layers:
        _reduce_after(layer.self_attn.o_proj, tp)
        ffn = getattr(layer, layer.ffn_name)
        if isinstance(ffn, GatedMLP):
            _reduce_after(ffn.down_proj, tp)
            layer.tp_reduce = tp.all_reduce  # the fused row paths call the kernels, not the modules' forwards
        else:
            _reduce_after(ffn, tp)  # MoE: once after the whole block
    head, vocab = model.lm_head, model.model.embed_tokens.vocab_size
    local = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return tp.all_gather_last(local(hidden))[..., :vocab]

    head.forward = forward


def shard_hf_tensors(model: nn.Module, tp: TensorParallelGroup, items):
    """Whole tensors by HF name (a checkpoint's, or an RL trainer's push) -> this rank's pieces of them, for
    `load_weights` on the split model. The piece is read off the shapes: a tensor this rank holds whole is
    kept whole, one split N ways along a dimension gives the rank's 1/N of it, the vocabulary's rows are the
    rank's padded slice; row-parallel biases, which only rank 0 holds, are skipped elsewhere."""
    from ember.models.loader import _target, hf_parameter_map

    local, config = hf_parameter_map(model), model.config
    # checkpoints that store q|k|v (or gate|up) as one tensor (Phi-3): each part is cut as the module's was
    fused = {id(p): m.tp_split for m in model.modules() if getattr(m, "fused_checkpoint", False)
             and getattr(m, "tp_split", None) is not None
             for p in (getattr(m, "weight", None), m.bias) if p is not None}
    for name, tensor in items:
        entry = local.get(name)
        if entry is None:
            if not (tp.rank and name.endswith(("o_proj.bias", "down_proj.bias"))):
                yield name, tensor  # for load_weights to name as unexpected
            continue
        shape, full = tuple(_target(*entry).shape), tuple(tensor.shape)
        if shape == full:
            yield name, tensor
            continue
        split = [d for d in range(len(full)) if len(shape) == len(full) and full[d] != shape[d]]
        if len(split) != 1:
            yield name, tensor  # load_weights reports the mismatch, naming the tensor
            continue
        d = split[0]
        if name.endswith(_KV_NAMES) and d == 0:
            yield name, _kv_piece(tensor, config.head_dim, config.num_kv_heads, tp)
            continue
        if id(entry[0]) in fused and d == 0:
            yield name, fused[id(entry[0])].cut_rows(None, tensor)
            continue
        per_rank = shape[d]
        start = tp.rank * per_rank
        piece = tensor.narrow(d, min(start, full[d]), max(0, min(per_rank, full[d] - start)))
        if piece.shape[d] < per_rank:  # the vocabulary's last slice: zero rows past its end
            pad = list(piece.shape)
            pad[d] = per_rank - piece.shape[d]
            piece = torch.cat((piece, piece.new_zeros(pad)), d)
        yield name, piece


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding table ([start, end) of the vocabulary, zero-padded to an even
    split); ids outside them look up zeros, and the all-reduce fills in every row."""

    def __init__(self, whole: nn.Embedding, tp: TensorParallelGroup):
        vocab = whole.num_embeddings
        per_rank = -(-vocab // tp.size)
        start = min(tp.rank * per_rank, vocab)
        end = min(start + per_rank, vocab)
        super().__init__(per_rank, whole.embedding_dim, device="meta")
        rows = torch.zeros(per_rank, whole.embedding_dim, dtype=whole.weight.dtype, device=whole.weight.device)
        rows[:end - start] = whole.weight[start:end]
        self.weight = nn.Parameter(rows, requires_grad=False)
        self.vocab_start, self.vocab_end, self.vocab_size = start, end, vocab
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        out = F.embedding(torch.where(mine, ids - self.vocab_start, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(~mine.unsqueeze(-1), 0))


def _shard_vocabulary(model: nn.Module, tp: TensorParallelGroup) -> None:
    body = model.model
    embedding = VocabParallelEmbedding(body.embed_tokens, tp)
    head = model.lm_head
    if model.config.tie_word_embeddings:
        head_rows = embedding.weight
    else:
        padded = torch.zeros_like(embedding.weight)
        start, end = embedding.vocab_start, embedding.vocab_end
        padded[:end - start] = head.weight[start:end]
        head_rows = nn.Parameter(padded, requires_grad=False)
    body.embed_tokens = embedding
    head.weight = head_rows
    head.out_features = head_rows.shape[0]
