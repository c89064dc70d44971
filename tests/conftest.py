"""Shared fixtures: tiny random-init HF models written by transformers (nothing is downloaded)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Built GGUF tokenizers are cached under EMBER_CACHE: the tests' own, not the user's ~/.cache/ember.
os.environ.setdefault("EMBER_CACHE", tempfile.mkdtemp(prefix="ember-test-cache-"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 512
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024)


def hf_config(arch: str, **overrides):
    import transformers

    kwargs = {**BASE, **overrides}
    if arch == "llama":
        return transformers.LlamaConfig(**kwargs)
    if arch == "qwen2":
        kwargs.setdefault("tie_word_embeddings", True)
        return transformers.Qwen2Config(**kwargs)
    if arch == "mistral":
        kwargs.setdefault("sliding_window", 24)
        return transformers.MistralConfig(**kwargs)
    if arch == "mixtral":
        kwargs.setdefault("num_local_experts", 4)
        kwargs.setdefault("num_experts_per_tok", 2)
        return transformers.MixtralConfig(**kwargs)
    if arch == "qwen2_moe":
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80, tie_word_embeddings=False, norm_topk_prob=False)
        return transformers.Qwen2MoeConfig(**kwargs)
    if arch == "qwen3":
        kwargs.setdefault("head_dim", 32)  # not hidden / heads, as in the real ones
        kwargs.setdefault("tie_word_embeddings", True)
        return transformers.Qwen3Config(**kwargs)
    if arch == "qwen3_moe":
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                      head_dim=32)
        return transformers.Qwen3MoeConfig(**kwargs)
    if arch == "gemma2":
        kwargs.setdefault("query_pre_attn_scalar", 24)  # not head_dim: the scale is its own field
        kwargs.update(head_dim=32, sliding_window=kwargs.get("sliding_window", 16),
                      attn_logit_softcapping=kwargs.get("attn_logit_softcapping", 5.0),
                      final_logit_softcapping=kwargs.get("final_logit_softcapping", 3.0))
        return transformers.Gemma2Config(**kwargs)
    if arch == "gemma3":  # local (sliding, rope 10k) and global (rope 1M, linear scaling) layers
        kwargs.update(head_dim=32, query_pre_attn_scalar=32, sliding_window=kwargs.get("sliding_window", 16),
                      layer_types=["sliding_attention", "full_attention"] * (kwargs["num_hidden_layers"] // 2),
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})
        return transformers.Gemma3TextConfig(**kwargs)
    if arch == "phi3":
        kwargs.setdefault("pad_token_id", 0)
        return transformers.Phi3Config(**kwargs)
    if arch == "olmo2":
        kwargs.setdefault("pad_token_id", 0)
        return transformers.Olmo2Config(**kwargs)
    if arch == "smollm3":  # layer 1 without rotary (NoPE)
        kwargs.update(no_rope_layers=[1, 0] * (kwargs["num_hidden_layers"] // 2), pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
        return transformers.SmolLM3Config(**kwargs)
    if arch == "gpt_oss":  # sinks, a window, yarn rope, biased router and experts
        kwargs.update(num_local_experts=4, num_experts_per_tok=2, head_dim=32, sliding_window=16,
                      layer_types=["sliding_attention", "full_attention"] * (kwargs["num_hidden_layers"] // 2))
        return transformers.GptOssConfig(**kwargs)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=kwargs["hidden_size"], n_layer=kwargs["num_hidden_layers"],
                                       n_head=kwargs["num_attention_heads"], vocab_size=kwargs["vocab_size"],
                                       n_positions=kwargs["max_position_embeddings"],
                                       initializer_range=kwargs.get("initializer_range", 0.02))
    raise ValueError(arch)


def save_hf_model(path: Path, arch: str, seed: int = 0, std: float = 0.02, **overrides) -> Path:
    """A random-init transformers model saved with its own save_pretrained, plus a tokenizer."""
    import transformers

    from ember.bench.models import write_tokenizer

    config = hf_config(arch, initializer_range=std, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.save_pretrained(path)
    write_tokenizer(path, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", seed: int = 0, std: float = 0.02, **overrides) -> Path:
        key = (arch, seed, std, repr(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-model")
            cache[key] = save_hf_model(path, arch, seed, std, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(model_factory):
    return model_factory("llama")


def load_hf(path: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory):
    from ember.bench.models import corpus_text, write_tokenizer

    root = tmp_path_factory.mktemp("train-assets")
    write_tokenizer(root / "tok", vocab_size=384)
    (root / "train.txt").write_text(corpus_text() * 6)
    return root


def children_of(pid: int) -> list[int]:
    """Child processes of any of `pid`'s threads (ember starts its workers from a keeper thread: ember.process)."""
    from pathlib import Path

    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return found
