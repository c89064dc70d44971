"""Engine greedy generation against transformers' generate (fp32, random-init models)."""

import pytest
import torch

from ember import LLM, SamplingParams
from tests.conftest import VOCAB, load_hf

ARCHS = {"llama": {}, "qwen2": {}, "mistral": {"sliding_window": 24}, "gpt2": {}, "mixtral": {}, "qwen2_moe": {},
         # round 2's families, each exercising its attention features in the paged kernel: q/k norms, windows
         # smaller than the prompts, soft-capping, local/global rope, NoPE layers, sinks, partial rotary
         "qwen3": {}, "qwen3_moe": {}, "gemma2": {}, "gemma3": {}, "olmo2": {}, "smollm3": {}, "gpt_oss": {},
         "phi3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}}


def hf_greedy(model, prompt, num_tokens):
    import transformers

    config = transformers.GenerationConfig(
        max_new_tokens=num_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        output_scores=True, return_dict_in_generate=True,
    )
    out = model.generate(torch.tensor([prompt]), generation_config=config)
    tokens = out.sequences[0, len(prompt):].tolist()
    top5 = [set(s[0].log_softmax(-1).topk(5).indices.tolist()) for s in out.scores]
    return tokens, top5


def check_logprobs_close(ours, ours_top5, ref, ref_top5):
    """vLLM's rule: equal, or at the first difference each side's token is in the other's top-5.
    Returns True when the sequences diverged."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert a in ref_top5[i] and b in ours_top5[i], f"position {i}: {a} vs {b}"
            return True
    return False


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_matches_transformers(model_factory, arch):
    path = model_factory(arch, std=0.1, **ARCHS[arch])
    ref = load_hf(path)
    llm = LLM(str(path), dtype="float32")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 13, 16, 17, 31, 40, 70)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=5)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    diverged = 0
    for prompt, out in zip(prompts, outputs):
        ours = out.outputs[0].token_ids
        assert len(ours) == 64 and out.outputs[0].finish_reason == "length"
        ours_top5 = [set(lp) for lp in out.outputs[0].logprobs]
        ref_tokens, ref_top5 = hf_greedy(ref, prompt, 64)
        diverged += check_logprobs_close(ours, ours_top5, ref_tokens, ref_top5)
    assert diverged <= 1


def test_logprobs_match_transformers(llama_dir):
    ref = load_hf(llama_dir)
    llm = LLM(str(llama_dir), dtype="float32")
    prompt = list(range(10, 30))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True), use_tqdm=False)[0]
    seq = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        expected = ref(torch.tensor([seq])).logits[0].log_softmax(-1)
    total = 0.0
    for i, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = expected[len(prompt) - 1 + i]
        assert abs(entry[token].logprob - row[token].item()) < 1e-5
        assert entry[token].rank == 1  # greedy picks the top token
        top = row.topk(3).indices.tolist()
        assert set(top) <= set(entry)
        total += row[token].item()
    assert abs(out.outputs[0].cumulative_logprob - total) < 1e-4
