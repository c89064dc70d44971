"""Bad input: a ValueError naming the field and the value, before any work is queued."""

import pytest

from ember import LLM, SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(logit_bias={3: 500.0}), "logit_bias"),
        (dict(n=129), "n"),
        (dict(n=2**31), "n"),
        (dict(seed=2**64), "seed"),
        (dict(seed=2**64 - 2, n=4), "seed"),  # the n-th child's seed + 3 would overflow
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(stop=["x"] * 65), "stop"),
        (dict(stop=["x" * 1025]), "stop"),
        (dict(stop_token_ids=list(range(1025))), "stop_token_ids"),
        (dict(logit_bias={i: 1.0 for i in range(1025)}), "logit_bias"),
        (dict(logit_bias={3: float("nan")}), "logit_bias"),
        (dict(n=True), "n"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: .*invalid"):
        SamplingParams(**kwargs)


def test_extreme_seeds_and_token_ids_are_checked_before_the_engine_step(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    for seed in (2**64 - 1, -(2**63), 0):  # the ends of the range run
        assert llm.generate(["x"], SamplingParams(seed=seed, max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="^logit_bias: .*vocabulary"):
        llm.generate(["x"], SamplingParams(logit_bias={vocab: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="^stop_token_ids: .*vocabulary"):
        llm.generate(["x"], SamplingParams(stop_token_ids=[vocab + 5]), use_tqdm=False)
    with pytest.raises(ValueError, match="^prompt: not valid text"):
        llm.generate(["bad \ud800"], SamplingParams(), use_tqdm=False)
    assert llm.generate(["x"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_bad_prompts_and_models(llama_dir, tmp_path):
    llm = LLM(str(llama_dir), dtype="float32", max_model_len=64)
    ok = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="prompt: '' is empty"):
        llm.generate([""], ok)
    with pytest.raises(ValueError, match="prompt: 64 tokens do not fit"):
        llm.generate([[1] * 64], ok)
    with pytest.raises(ValueError, match=r"prompt_token_ids: \[9999\]"):
        llm.generate([[1, 9999]], ok)
    with pytest.raises(ValueError, match="prompt: it has no tokens"):
        llm.generate([{"prompt_token_ids": []}], ok)
    # a bad prompt in a batch queues nothing, and the engine is fine afterwards
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], ok)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.get_stats()["num_free_blocks"] == llm.engine.get_stats()["num_blocks"]
    out = llm.generate(["fine"], ok, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4

    with pytest.raises(ValueError, match="is not a directory, a .gguf file, a known model name"):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(llama_dir), max_model_len=10**6)
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(llama_dir), dtype="int3")
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(str(llama_dir), max_num_sequences=3)


def test_max_tokens_is_capped_by_the_context(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", max_model_len=40)
    out = llm.generate([[1] * 30], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"
