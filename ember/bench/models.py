"""Benchmark and test models: a byte-level BPE tokenizer trained offline, and random-init
HF-format checkpoints (the shapes the benchmark workloads prescribe), written by ember itself."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

BENCH_MODELS: dict[str, dict[str, Any]] = {
    "bench-llama-56m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=512, intermediate_size=1408,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
        tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-6,
    ),
    "bench-qwen2-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
        use_sliding_window=False, sliding_window=None,
    ),
    # Not models the workloads prescribe: Qwen3-0.6B's shape (issue 21: per-head q/k norms, head_dim 128 of
    # hidden 1024), and the small random Mixture-of-Experts of issue 11's benchmark.
    "bench-qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6,
        attention_bias=False, use_sliding_window=False, sliding_window=None,
    ),
    "bench-mixtral-small": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=512, intermediate_size=704,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
        num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False, rope_theta=10000.0,
        max_position_embeddings=4096, rms_norm_eps=1e-6, sliding_window=None, router_aux_loss_coef=0.01,
    ),
}


def corpus_text() -> str:
    return resources.files("ember.bench").joinpath("corpus.txt").read_text(encoding="utf-8")


def large_corpus() -> list[str]:
    """Enough text for a tokenizer of a benchmark model's full vocabulary (32k-152k entries): the
    bundled corpus and the running Python's standard library sources (code and English docstrings),
    present on every machine, read in a fixed order."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    lines = corpus_text().splitlines()
    for path in files:
        try:
            lines += path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
    return lines


def write_tokenizer(out_dir: str | Path, vocab_size: int = 1024, chat_template: str = CHAT_TEMPLATE,
                    corpus: list[str] | None = None) -> None:
    """Train a byte-level BPE (on the bundled corpus unless given one); write tokenizer.json and its config.
    A tokenizer for a model's whole vocabulary gets exactly `vocab_size` entries: if the corpus runs out of
    merges first, the rest are spelled as plain added tokens, so every id decodes to text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=corpus is not None,
    )
    tokenizer.train_from_iterator(corpus if corpus is not None else corpus_text().splitlines(), trainer=trainer)
    if corpus is not None and tokenizer.get_vocab_size() < vocab_size:
        missing = vocab_size - tokenizer.get_vocab_size()
        tokenizer.add_tokens([AddedToken(f"<|extra_{i}|>", special=False) for i in range(missing)])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": chat_template,
        "model_max_length": 1 << 30,
    }, indent=2))
    ids = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}, indent=2))


def make_bench_model(name: str, out_dir: str | Path) -> Path:
    """A benchmark model whose tokenizer covers its whole vocabulary (a random model samples every id:
    each must decode to text, or streaming, stop strings and logprobs measured on it mean little)."""
    if name not in BENCH_MODELS:
        raise ValueError(f"model name: {name!r} is not one of {sorted(BENCH_MODELS)}")
    from ember.models.loader import write_random_model

    out_dir = Path(out_dir)
    hf = dict(BENCH_MODELS[name])
    print(f"training a {hf['vocab_size']}-token byte-level BPE for {name} ...", flush=True)
    write_tokenizer(out_dir, vocab_size=hf["vocab_size"], corpus=large_corpus())
    eos = json.loads((out_dir / "generation_config.json").read_text())["eos_token_id"]
    hf.update(eos_token_id=eos, bos_token_id=None, torch_dtype="bfloat16")
    write_random_model(out_dir, hf)
    return out_dir


def make_draft_model(model_dir: str | Path, out_dir: str | Path, num_layers: int = 2) -> Path:
    """A draft for speculative decoding: the first `num_layers` decoder layers of a model with its
    embeddings, final norm and head (so it often agrees with its target), in HF format."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ember.models.loader import safetensors_files

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    if config.get("layer_types"):
        config["layer_types"] = config["layer_types"][:num_layers]
    kept = {}
    for path in safetensors_files(model_dir):
        for name, tensor in load_file(str(path)).items():
            if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= num_layers:
                continue
            kept[name] = tensor
    save_file(kept, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out_dir / name)
    return out_dir
