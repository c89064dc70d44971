"""LoRA serving: PEFT adapters against transformers + PEFT, several adapters and the base in one batch,
adapters beyond max_loras, and bad adapter directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.lora import LoRARequest
from tests.conftest import load_hf

peft = pytest.importorskip("peft")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int, r: int = 8, targets=ALL_LINEAR, alpha: int = 16) -> Path:
    """A PEFT adapter with random non-zero A and B (PEFT's own init leaves B zero: no effect to test)."""
    if out.exists():
        return out
    model = load_hf(base)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return out


def reference(base: Path, adapter: Path | None, prompts, num_tokens: int):
    """transformers (+ PEFT) greedy tokens and prompt logprobs."""
    model = load_hf(base)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).eval()
    tokens, prompt_lps = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logprobs = model(ids).logits[0].float().log_softmax(-1)
            prompt_lps.append([logprobs[i - 1, t].item() for i, t in enumerate(prompt) if i > 0])
            out = model.generate(ids, max_new_tokens=num_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            tokens.append(out[0, len(prompt):].tolist())
    return tokens, prompt_lps


PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 53)), [100, 7, 300, 4]]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_peft_adapter_matches_transformers_peft(model_factory, tmp_path_factory, arch):
    base = model_factory(arch, std=0.1)
    adapter = make_adapter(base, tmp_path_factory.mktemp("lora") / "a", seed=1)
    want_tokens, want_lps = reference(base, adapter, PROMPTS, 16)
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_lora_rank=8)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=LoRARequest("a", 1, str(adapter)))
    for out, tokens, lps in zip(outs, want_tokens, want_lps):
        assert out.outputs[0].token_ids == tokens
        got = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
        assert max(abs(a - b) for a, b in zip(got, lps)) < 1e-4
    # the adapter changes the output: the test is not passing on the base model's tokens
    base_tokens, _ = reference(base, None, PROMPTS, 16)
    assert base_tokens != want_tokens


@pytest.fixture(scope="module")
def four_adapters(model_factory, tmp_path_factory):
    base = model_factory("llama", std=0.1)
    root = tmp_path_factory.mktemp("loras")
    targets = [ALL_LINEAR, ["q_proj", "v_proj"], ["gate_proj", "down_proj"], ["o_proj", "up_proj", "k_proj"]]
    adapters = [make_adapter(base, root / f"a{i}", seed=10 + i, r=4 + 2 * i, targets=t) for i, t in enumerate(targets)]
    return base, [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]


def tokens_of(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("max_loras", [4, 2])
def test_adapters_and_base_in_one_batch_match_each_alone(four_adapters, max_loras):
    """4 adapters + the base model, the same prompts (so a shared prefix cache would mix their KV): each
    request gets the tokens it gets alone; with max_loras=2 the others wait for a slot."""
    base, loras = four_adapters
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(10)]
    which = [None, *loras] * 2
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=max_loras, max_lora_rank=16)
    mixed = tokens_of(llm.generate(prompts, params, use_tqdm=False, lora_request=which))
    for prompt, lora, got in zip(prompts, which, mixed):
        alone = LLM(str(base), dtype="float32", enable_lora=True, max_lora_rank=16) if lora is None else None
        engine = alone or llm
        assert tokens_of(engine.generate([prompt], params, use_tqdm=False, lora_request=lora)) == [got]
    assert len({tuple(t) for t in mixed[:5]}) == 5  # each adapter (and the base) answers differently


def test_bad_adapters_are_clear_errors(four_adapters, model_factory, tmp_path):
    base, loras = four_adapters
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_lora_rank=8)
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="rank 10, more than max_lora_rank=8"):
        llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=loras[3])
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=LoRARequest("x", 9, str(tmp_path)))
    other = model_factory("llama", std=0.1, hidden_size=96)  # another base model's shapes
    wrong_base = make_adapter(other, tmp_path / "other", seed=3, r=4)
    with pytest.raises(ValueError, match="another base model"):
        llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=LoRARequest("o", 7, str(wrong_base)))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    config = json.loads((Path(loras[1].lora_path) / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(Path(loras[1].lora_path) / "adapter_model.safetensors"))
    save_file({k.replace("q_proj", "query"): v for k, v in tensors.items()}, str(renamed / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.query', which this model does not have"):
        llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=LoRARequest("r", 8, str(renamed)))
    plain = LLM(str(base), dtype="float32")
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=loras[0])
    # the engine still serves after the refusals
    assert len(llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=loras[0])[0].outputs[0].token_ids) == 2


def test_admitted_requests_survive_their_adapter_vanishing(four_adapters, tmp_path):
    """A request keeps the adapter it was admitted with: deleting (or re-binding) the directory afterwards
    fails nobody, and a rank that is not the config's r is refused when read."""
    import shutil

    base, loras = four_adapters
    copy = tmp_path / "copy"
    shutil.copytree(loras[0].lora_path, copy)
    lora = LoRARequest("copy", 11, str(copy))
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=16)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = tokens_of(llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=lora))
    engine = llm.engine
    engine.add_request("a", PROMPTS[0], params, lora_request=lora)
    engine.add_request("b", PROMPTS[1], params, lora_request=loras[1])  # evicts "copy" from memory (capacity 1)
    shutil.rmtree(copy)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert [finished["a"]] == want and len(finished["b"]) == 6
    config = json.loads((Path(loras[1].lora_path) / "adapter_config.json").read_text())
    wrong = tmp_path / "wrong"
    shutil.copytree(loras[1].lora_path, wrong)
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] + 2}))
    with pytest.raises(ValueError, match="not its adapter_config.json r="):
        llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=LoRARequest("w", 12, str(wrong)))
