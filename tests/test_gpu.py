"""CUDA: the engine, quantized serving and training on a GPU. Skipped where there is none (CI).

The rest of the suite also runs on a GPU machine (`.ci/gpu`): the engine picks CUDA by itself
there, so every engine test doubles as a CUDA test; these add what needs a GPU by name.
"""

import json

import pytest
import torch

from ember import LLM, SamplingParams
from tests.conftest import load_hf
from tests.engine.test_batching import random_prompts
from tests.engine.test_engine_parity import check_logprobs_close, hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_cuda_fp32_matches_transformers(model_factory, arch):
    path = model_factory(arch, std=0.1)
    llm = LLM(str(path), dtype="float32", device="cuda")
    assert next(llm.engine.model.parameters()).device.type == "cuda"
    ref = load_hf(path)
    prompts = random_prompts(8, seed=5, low=1, high=70)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    diverged = 0
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_top5 = hf_greedy(ref, prompt, 32)
        ours = out.outputs[0]
        diverged += check_logprobs_close(ours.token_ids, [set(lp) for lp in ours.logprobs], ref_tokens, ref_top5)
    assert diverged <= 1
    # Prompt logits through the packed path against transformers' plain forward.
    prompt = prompts[0]
    got = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for i, entry in enumerate(got.prompt_logprobs[1:], start=1):
        token = prompt[i]
        assert abs(entry[token].logprob - expected[i - 1, token].item()) < 1e-4


def test_cuda_bf16_greedy_agrees_with_transformers_bf16(model_factory):
    import transformers

    path = model_factory("llama", std=0.1)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(str(path), dtype="bfloat16", device="cuda")
    prompts = random_prompts(8, seed=6, low=4, high=60)
    diverged = 0
    for prompt, out in zip(prompts, llm.generate(prompts, GREEDY, use_tqdm=False)):
        config = transformers.GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                                               output_scores=True, return_dict_in_generate=True)
        hf = ref.generate(torch.tensor([prompt], device="cuda"), generation_config=config)
        ref_tokens = hf.sequences[0, len(prompt):].tolist()
        ref_top5 = [set(s[0].float().topk(5).indices.tolist()) for s in hf.scores]
        ours = out.outputs[0]
        diverged += check_logprobs_close(ours.token_ids, [set(lp) for lp in ours.logprobs], ref_tokens, ref_top5)
    assert diverged <= 4  # bf16 on random weights: near-ties; each divergence passed the top-5 rule


def test_cuda_batch_invariance_preemption_and_seeds(model_factory):
    path = str(model_factory("llama", std=0.1))
    prompts = random_prompts(32, seed=3)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(path, dtype="float32", device="cuda")
    singles = [llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:4]]
    batched = token_ids(llm.generate(prompts, greedy, use_tqdm=False))
    assert batched[:4] == singles

    block_bytes = 2 * 2 * 16 * 2 * 16 * 4
    tight = LLM(path, dtype="float32", device="cuda", kv_cache_gib=28 * block_bytes / 2**30, max_num_batched_tokens=256)
    assert token_ids(tight.generate(prompts, greedy, use_tqdm=False)) == batched
    stats = tight.engine.get_stats()
    assert stats["num_preemptions"] > 0 and stats["num_free_blocks"] == stats["num_blocks"]

    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate([prompts[5], prompts[0], prompts[7]], [greedy, seeded, greedy], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_cuda_quantized_matches_cpu_quantized(model_factory, method):
    """The same quantized weights and int8 KV cache on both devices (fp32 compute): the CUDA
    path dequantizes, the CPU one runs torch's or ember's kernels."""
    path = str(model_factory("llama", std=0.1))
    prompts = random_prompts(8, seed=8, low=8, high=40)
    kwargs = dict(dtype="float32", quantization=method, kv_cache_dtype="int8")
    cpu = LLM(path, device="cpu", **kwargs).generate(prompts, GREEDY, use_tqdm=False)
    cuda = LLM(path, device="cuda", **kwargs).generate(prompts, GREEDY, use_tqdm=False)
    diverged = 0
    for a, b in zip(cuda, cpu):
        a, b = a.outputs[0], b.outputs[0]
        diverged += check_logprobs_close(a.token_ids, [set(lp) for lp in a.logprobs],
                                         b.token_ids, [set(lp) for lp in b.logprobs])
    assert diverged <= 1


def test_cuda_sleep_frees_gpu_memory(model_factory):
    path = str(model_factory("llama", std=0.1))
    llm = LLM(path, dtype="float32", device="cuda", kv_cache_gib=0.1)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = random_prompts(4, seed=9)
    before = token_ids(llm.generate(prompts, params, use_tqdm=False))
    cache_bytes = sum(t.numel() * t.element_size() for layer in llm.engine.runner.kv_caches for t in layer)
    high = torch.cuda.memory_allocated()
    llm.engine.sleep()
    assert high - torch.cuda.memory_allocated() >= 0.9 * cache_bytes > 0
    llm.engine.wake()
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == before


def test_cuda_training_bf16_zero3_learns_and_matches_cpu(train_assets, tmp_path):
    from ember.train.config import TrainConfig
    from ember.train.trainer import Trainer
    from tests.train.conftest import write_config

    losses = {}
    for name, extra in {"cpu": {"device": "cpu"}, "cuda": {"device": "cuda"},
                        "cuda-bf16-z3": {"device": "cuda", "precision": "bf16", "zero_stage": 3}}.items():
        path = write_config(tmp_path / name, train_assets, max_steps=30, **extra)
        trainer = Trainer(TrainConfig.load(path))
        trainer.fit()
        assert trainer.d.device.type == extra["device"]
        records = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        losses[name] = [r["loss"] for r in map(json.loads, records) if "loss" in r]
    cpu, cuda, bf16 = losses["cpu"], losses["cuda"], losses["cuda-bf16-z3"]
    assert len(cpu) == len(cuda) == len(bf16) >= 20
    assert abs(cpu[0] - cuda[0]) < 1e-4  # the same fp32 model and batch on two devices
    assert max(abs(a - b) for a, b in zip(cpu, cuda)) < 1e-2
    assert bf16[-1] < bf16[0] - 0.5 and abs(bf16[0] - cpu[0]) < 0.05
