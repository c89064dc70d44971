"""ember's model layer against transformers: same files, same logits (fp32)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ember.models import load_model
from ember.models.loader import hf_state_dict
from tests.conftest import VOCAB, load_hf

VARIANTS = {
    "llama": ("llama", {}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2-tied-bias": ("qwen2", {}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "mistral-window": ("mistral", {"sliding_window": 24}),
    "llama3-rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 256}}),
    "linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "mha-headdim": ("llama", {"num_key_value_heads": 4, "head_dim": 32}),
    "gpt2": ("gpt2", {}),
    "mixtral": ("mixtral", {}),
    "qwen2-moe": ("qwen2_moe", {}),
    "qwen2-moe-sparse-step": ("qwen2_moe", {"decoder_sparse_step": 2}),
    "qwen3": ("qwen3", {}),
    "qwen3-moe": ("qwen3_moe", {}),
    "gemma2-softcap-window": ("gemma2", {}),
    "gemma3-local-global-rope": ("gemma3", {}),
    "phi3-partial-rotary": ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.75}}),
    # within the original context (80 < 128) both use the short factors; past it see test_longrope_past_...
    "phi3-longrope": ("phi3", {"max_position_embeddings": 512, "original_max_position_embeddings": 128,
                               "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "short_factor": [1.0 + i / 8 for i in range(8)],
                                                   "long_factor": [2.0 + i for i in range(8)],
                                                   "original_max_position_embeddings": 128}}),
    "olmo2": ("olmo2", {}),
    "smollm3-nope": ("smollm3", {}),
    "gpt-oss-sinks-yarn": ("gpt_oss", {}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_forward_matches_transformers(model_factory, variant):
    arch, overrides = VARIANTS[variant]
    path = model_factory(arch, std=0.1, **overrides)
    ref = load_hf(path)
    model, config = load_model(path, dtype="float32")
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 80))  # longer than the sliding window
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_longrope_past_the_original_context_uses_the_long_factors():
    """Phi-3's longrope: positions within the original context rotate with the short factors, later ones
    with the long factors and every position with the attention factor sqrt(1 + ln(s) / ln(original))
    (ember fixes each position's rotation so cached keys stay valid; transformers switches the whole
    sequence once it outgrows the original context)."""
    import math

    from ember.models.config import RopeConfig
    from ember.models.layers import Rotary

    rope = RopeConfig(theta=10000.0, type="longrope", factor=4.0, original_max_position_embeddings=128,
                      short_factor=tuple(1.0 + i / 8 for i in range(8)), long_factor=tuple(2.0 + i for i in range(8)))
    cos, _ = Rotary(rope, 16)(torch.tensor([5, 127, 128, 300]), torch.float32)
    base = 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    scaling = math.sqrt(1 + math.log(4.0) / math.log(128))
    for row, (position, factors) in enumerate([(5, rope.short_factor), (127, rope.short_factor),
                                               (128, rope.long_factor), (300, rope.long_factor)]):
        freqs = position / (torch.tensor(factors) * base)
        torch.testing.assert_close(cos[row], torch.cat((freqs, freqs)).cos() * scaling)


def test_packed_engine_forward_matches_training_forward(llama_dir):
    """The flat forward with a paged context equals the [B, T] forward row by row."""
    from ember import LLM, SamplingParams

    llm = LLM(str(llama_dir), dtype="float32", kv_cache_gib=0.01)
    model = llm.engine.model
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40)]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model(torch.tensor([prompt], device=llm.engine.device))[0].float().log_softmax(-1)
        for pos in range(1, len(prompt)):
            got = out.prompt_logprobs[pos][prompt[pos]].logprob
            assert abs(got - ref[pos - 1, prompt[pos]].item()) < 1e-5


def test_sharded_checkpoint_and_dtype(tmp_path, llama_dir):
    import transformers

    ref = load_hf(llama_dir)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((llama_dir / name).read_bytes())
    model, _ = load_model(tmp_path, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    for name, tensor in hf_state_dict(model).items():
        torch.testing.assert_close(tensor.float(), ref.state_dict()[name].bfloat16().float())
    assert isinstance(transformers.__version__, str)


def test_bad_checkpoints_give_clear_errors(tmp_path, llama_dir):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    config = json.loads((d / "config.json").read_text())

    (d / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_model(d)
    (d / "config.json").write_text(json.dumps(config))

    weights = d / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(d)

    tensors = {k: v.clone() for k, v in hf_state_dict(load_model(llama_dir)[0]).items()}
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight.*\(3, 3\)"):
        load_model(d)

    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="missing.*up_proj"):
        load_model(d)

    weights.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        load_model(d)
    with pytest.raises(ValueError, match="not a directory"):
        load_model(tmp_path / "nope")


NEW_FAMILIES = ["qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3", "olmo2", "smollm3", "gpt_oss"]


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_new_families_loss_prompt_logprobs_and_export(model_factory, tmp_path, arch):
    """Each round-2 family: the training forward's loss within 1e-5 of transformers', the engine's prompt
    logprobs within 1e-4 of transformers' log-softmax, and an exported directory that transformers loads
    to the very same logits (HF names round-trip, Phi-3's fused projections included)."""
    from ember import LLM, SamplingParams
    from ember.models.loader import save_model

    path = model_factory(arch, std=0.1)
    ref = load_hf(path)
    model, config = load_model(path, dtype="float32")
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(ids, labels=ids)
        logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(loss.item() - expected.loss.item()) < 1e-5

    prompt = ids[0].tolist()
    out = LLM(str(path), dtype="float32").generate(
        [prompt], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)[0]
    reference = expected.logits[0].log_softmax(-1)
    worst = max(abs(out.prompt_logprobs[pos][prompt[pos]].logprob - reference[pos - 1, prompt[pos]].item())
                for pos in range(1, len(prompt)))
    assert worst < 1e-4, worst

    save_model(model, config, tmp_path / "export")
    with torch.no_grad():  # loaded as the reference was (eager attention): the same computation, the same bits
        assert torch.equal(load_hf(tmp_path / "export")(ids).logits, expected.logits)


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration: ember serves the text model (vision tower and projector left out,
    said in a log line) with the logits transformers' multimodal class gives for text alone."""
    import transformers

    from tests.conftest import hf_config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=hf_config("gemma3", initializer_range=0.1).to_dict(),
                                       vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                                       boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)
    torch.manual_seed(0)
    reference = transformers.Gemma3ForConditionalGeneration(config).eval()
    reference.save_pretrained(tmp_path)
    model, ours = load_model(tmp_path, dtype="float32")
    assert ours.architecture == "Gemma3ForConditionalGeneration"
    ids = torch.randint(0, VOCAB - 5, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_gpt_oss_mxfp4_experts_load_as_their_values(model_factory, tmp_path):
    """gpt-oss's original checkpoints: experts in MXFP4 blocks and scales (quantization_config mxfp4), decoded
    at load as transformers decodes them, giving the logits of the same values stored dense."""
    import shutil

    import transformers.integrations.mxfp4 as mxfp4
    from safetensors.torch import load_file

    from ember.models.moe import dequantize_mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 6, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 130, (2, 6, 4), generator=g, dtype=torch.uint8)
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales), mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))

    dense_dir = model_factory("gpt_oss", std=0.1)
    tensors = load_file(str(next(dense_dir.glob("*.safetensors"))))
    packed = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> MXFP4 of [E, out, in]
            experts, k, n = t.shape
            b = torch.randint(0, 256, (experts, n, k // 32, 16), generator=g, dtype=torch.uint8)
            s = torch.randint(118, 124, (experts, n, k // 32), generator=g, dtype=torch.uint8)
            packed[f"{name}_blocks"], packed[f"{name}_scales"] = b, s
            tensors[name] = dequantize_mxfp4(b, s)
    packed.update({n: t for n, t in tensors.items() if not n.endswith(("gate_up_proj", "down_proj"))})
    for folder, weights in (("dense", tensors), ("mxfp4", packed)):
        shutil.copytree(dense_dir, tmp_path / folder)
        save_file(weights, str(next((tmp_path / folder).glob("*.safetensors"))))
    config = json.loads((tmp_path / "mxfp4" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "self_attn"]}
    (tmp_path / "mxfp4" / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, VOCAB, (2, 24), generator=g)
    with torch.no_grad():
        want = load_model(tmp_path / "dense", dtype="float32")[0](ids)
        assert torch.equal(load_model(tmp_path / "mxfp4", dtype="float32")[0](ids), want)
