"""GGUF files: exact block decoding, models and tokenizers against their HF directories and transformers'
own GGUF loading, and clear errors for what ember cannot read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.models import cpu_ops, load_model
from ember.models.gguf_blocks import DECODERS, decode
from ember.models.quant import QuantizedEmbedding, QuantizedLinear
from ember.tokenizer import Tokenizer
from tests.conftest import VOCAB
from tests.models.gguf_files import write_gguf

gguf = pytest.importorskip("gguf")


# Byte offsets of each block format's fp16 scale fields (ggml-common.h).
_SCALE_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2],
                 "Q5_K": [0, 2], "Q6_K": [208]}


def _random_blocks(type_name: str, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    """Random blocks with sane fp16 scales: random bytes everywhere else, so every bit pattern of the
    quantized values and of the packed 6-bit scales occurs."""
    _, _, size = DECODERS[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    for at in _SCALE_FIELDS[type_name]:
        raw[..., at:at + 2] = rng.uniform(1e-3, 2e-2, size=(rows, blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, blocks * size)


@pytest.mark.parametrize("type_name", sorted(DECODERS))
def test_block_formats_decode_exactly(type_name):
    """ember's decoding of every mapped format gives gguf's own dequantized values, and the packed
    layout the kernels read (int4: 0..15; int8: signed) holds them with no rounding."""
    raw = _random_blocks(type_name, rows=8, blocks=3 if DECODERS[type_name][1] == 256 else 12)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    packed = decode(type_name, raw)
    assert packed.shape == expected.shape
    assert (packed.q.min() >= 0 and packed.q.max() <= 15) if packed.bits == 4 else packed.q.dtype == torch.int8
    np.testing.assert_allclose(packed.dequantize().numpy(), expected, rtol=1e-6, atol=1e-7)
    as_int8 = packed.as_int8(16)
    np.testing.assert_allclose(as_int8.dequantize().numpy(), expected, rtol=1e-6, atol=1e-7)


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).float()


def _transformers_gguf(path: Path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


IDS = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral", "qwen2_moe", "gpt2", "qwen3", "qwen3_moe", "gemma2",
                                  "gemma3"])
def test_f32_gguf_is_the_hf_model(model_factory, tmp_path, arch):
    """llama.cpp's names, q/k row order (llama), stacked experts and GPT-2's transposes undone: the
    same logits as the HF directory, to fp32 rounding."""
    # Gemma 2 in a GGUF scales queries by head_dim ** -0.5 (llama.cpp's rule; the file has no field for it)
    hf_dir = model_factory(arch, **({"query_pre_attn_scalar": 32} if arch == "gemma2" else {}))
    path = write_gguf(hf_dir, tmp_path / f"{arch}.gguf", "F32")
    reference, _ = load_model(hf_dir, dtype="float32")
    model, config = load_model(path, dtype="float32")
    assert config.architecture == reference.config.architecture
    torch.testing.assert_close(_logits(model, IDS), _logits(reference, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,weight_type", [("llama", "Q8_0"), ("llama", "Q4_1"), ("llama", "Q5_0"),
                                              ("qwen2", "Q4_0"), ("gpt2", "F16")])
def test_quantized_gguf_matches_transformers(model_factory, tmp_path, arch, weight_type):
    """Against transformers loading the same file (dequantized to fp32): the weights ember keeps in its
    int4/int8 layouts hold the same values; its kernels round activations to int16 (~1e-4)."""
    hf_dir = model_factory(arch)
    path = write_gguf(hf_dir, tmp_path / f"{arch}-{weight_type}.gguf", weight_type)
    model, _ = load_model(path, dtype="float32")
    if weight_type.startswith("Q"):
        kinds = {type(m) for m in model.modules()}
        if cpu_ops.int_kernels_available():  # kept in their blocks' precision on ember's integer kernels
            assert QuantizedLinear in kinds and QuantizedEmbedding in kinds, kinds
    reference = _transformers_gguf(path)
    with torch.inference_mode():
        expected = reference(IDS).logits.float()
    got = _logits(model, IDS)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


def test_quantized_moe_gguf_is_close_to_the_hf_model(model_factory, tmp_path):
    """Qwen2-MoE in Q8_0 (transformers' GGUF reader drops its expert sizes, so the HF directory is the
    reference): experts are dequantized, the attention projections stay int8."""
    hf_dir = model_factory("qwen2_moe")
    model, _ = load_model(write_gguf(hf_dir, tmp_path / "moe.gguf", "Q8_0"), dtype="float32")
    if cpu_ops.int_kernels_available():  # (without them, e.g. an AVX2-only CPU, Q8_0 is dequantized at load)
        assert isinstance(model.model.layers[0].self_attn.qkv_proj, QuantizedLinear)
    reference, _ = load_model(hf_dir, dtype="float32")
    got, expected = _logits(model, IDS), _logits(reference, IDS)
    assert ((got - expected).norm() / expected.norm()).item() < 0.02
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_gguf_runs_in_the_engine_as_the_hf_directory_does(model_factory, tmp_path):
    from ember import LLM, SamplingParams

    hf_dir = model_factory("llama")
    path = write_gguf(hf_dir, tmp_path / "model.gguf", "F32")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    want = [o.outputs[0].token_ids for o in LLM(str(hf_dir), dtype="float32").generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in LLM(str(path), dtype="float32").generate(prompts, params)]
    assert got == want
    folder = tmp_path / "folder"  # a directory holding one .gguf loads too
    folder.mkdir()
    (folder / "model.gguf").symlink_to(path)
    assert [o.outputs[0].token_ids for o in LLM(str(folder), dtype="float32").generate(prompts, params)] == want


TEXTS = ["Hello world! 12345 What's up?", "  leading and trailing spaces  ", "tabs\tand\nnew\n\nlines",
         "naïve café — 東京 🚀", "<|im_start|>user\nhi<|im_end|>\n", "x = [i ** 2 for i in range(10)]"]


def test_byte_level_gguf_tokenizer_is_the_hf_tokenizer(model_factory, tmp_path):
    hf_dir = model_factory("llama")
    path = write_gguf(hf_dir, tmp_path / "model.gguf", "F32")
    ours, reference = Tokenizer(path), Tokenizer(hf_dir)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text))
    messages = [{"role": "user", "content": "hi there"}]
    assert ours.encode_chat(messages) == reference.encode_chat(messages)
    assert ours.eos_token_id == reference.eos_token_id


def _sentencepiece_gguf(tmp_path: Path, add_space_prefix: bool = True) -> Path:
    """A llama GGUF whose vocabulary is SentencePiece BPE (Llama 2 / Mistral style): <unk> <s> </s>,
    256 byte tokens, then pieces ranked by score; trained on ember's bundled corpus."""
    from tokenizers import SentencePieceBPETokenizer

    from ember.bench.models import corpus_text

    trained = SentencePieceBPETokenizer(add_prefix_space=True)
    trained.train_from_iterator([corpus_text()], vocab_size=600, min_frequency=2, show_progress=False)
    pieces = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [p for p, _ in pieces if p not in tokens]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for key, value in dict(block_count=1, context_length=64, embedding_length=32, feed_forward_length=64,
                           head_count=2, head_count_kv=2, layer_norm_rms_eps=1e-5).items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(add_space_prefix)
    rng = np.random.default_rng(0)
    for name, shape in [("token_embd.weight", (len(tokens), 32)), ("output_norm.weight", (32,)),
                        ("blk.0.attn_norm.weight", (32,)), ("blk.0.ffn_norm.weight", (32,)),
                        ("blk.0.attn_q.weight", (32, 32)), ("blk.0.attn_k.weight", (32, 32)),
                        ("blk.0.attn_v.weight", (32, 32)), ("blk.0.attn_output.weight", (32, 32)),
                        ("blk.0.ffn_gate.weight", (64, 32)), ("blk.0.ffn_up.weight", (64, 32)),
                        ("blk.0.ffn_down.weight", (32, 64))]:
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * 0.02)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "spm.gguf"


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    """Against transformers' tokenizer for the same file; where text starts with a space the two differ
    and ember does what llama.cpp (and SentencePiece itself) does: one "▁" more, always."""
    transformers = pytest.importorskip("transformers")
    path = _sentencepiece_gguf(tmp_path)
    ours = Tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    spaced = "  leading and trailing spaces  "
    pieces = [ours.id_to_token(i) for i in ours.encode(spaced)]
    assert pieces[:3] == ["<s>", "\u2581", "\u2581"] and pieces[3].startswith("\u2581"), pieces  # three spaces
    for text in [t for t in TEXTS if not t.startswith(" ")] + ["The interpreter reads a line", "Ünïcödé ✓ \x07"]:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.encode(text)[0] == 1  # llama.cpp adds BOS to a SentencePiece vocabulary
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text), skip_special_tokens=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True, timeout=600)


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_bad_gguf_files_are_one_clear_line(model_factory, tmp_path):
    good = write_gguf(model_factory("llama"), tmp_path / "good.gguf", "Q8_0")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 3])
    _assert_one_line_error(_cli("generate", "hi", "--model", str(truncated)), "truncated.gguf")

    other = tmp_path / "mamba.gguf"  # an architecture ember does not build
    writer = gguf.GGUFWriter(str(other), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_one_line_error(_cli("generate", "hi", "--model", str(other)), "mamba", "not supported")

    unknown = tmp_path / "unknown-type.gguf"  # a tensor type id no GGML version has
    blob = bytearray(data)
    tensor = gguf.GGUFReader(str(good)).tensors[0]
    # A tensor's info is: name length, name, n_dims, dims, type, data offset.
    offset = tensor.field.offset + sum(part.nbytes for part in tensor.field.parts[:-2])
    assert int.from_bytes(blob[offset:offset + 4], "little") == int(tensor.tensor_type)
    blob[offset:offset + 4] = (250).to_bytes(4, "little")
    unknown.write_bytes(bytes(blob))
    _assert_one_line_error(_cli("generate", "hi", "--model", str(unknown)), "unknown-type.gguf", "type")


def test_a_folder_of_several_ggufs_asks_which(model_factory, tmp_path):
    for name in ("a-Q8_0.gguf", "a-Q4_0.gguf"):
        write_gguf(model_factory("llama"), tmp_path / name, name[2:6])
    with pytest.raises(ValueError, match="several GGUF files"):
        load_model(tmp_path)
    model, _ = load_model(tmp_path / "a-Q4_0.gguf")
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)


def test_metadata_becomes_the_hf_config(model_factory, tmp_path):
    from ember.models.config import ModelConfig
    from ember.models.gguf import open_gguf

    hf_dir = model_factory("qwen2_moe")
    hf = ModelConfig.from_dir(hf_dir)
    config = open_gguf(write_gguf(hf_dir, tmp_path / "m.gguf", "F32")).config()
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "tie_word_embeddings", "qkv_bias"):
        assert getattr(config, field) == getattr(hf, field), field
    assert config.rope.theta == hf.rope.theta
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    raw = json.loads((hf_dir / "config.json").read_text())
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
        assert config.raw[key] == raw[key], key
