"""kv_cache_dtype="int8": the engine's outputs stay close to the unquantized cache, in half the bytes."""

import pytest

from ember import LLM, SamplingParams
from ember.registry import default_model_dir


def check_logprobs_close(outs_a, outs_b) -> float:
    """vLLM's rule: greedy outputs agree until they first differ, and there each side's token is in
    the other's top-5. Returns the share of tokens generated before any difference."""
    agreed = total = 0
    for a, b in zip(outs_a, outs_b):
        ca, cb = a.outputs[0], b.outputs[0]
        total += len(ca.token_ids)
        for i, (x, y) in enumerate(zip(ca.token_ids, cb.token_ids)):
            if x != y:
                assert x in cb.logprobs[i] and y in ca.logprobs[i], (a.prompt, i, x, y)
                break
            agreed += 1
    return agreed / total


@pytest.mark.parametrize("backend", ["auto", "torch_paged"])
def test_int8_cache_outputs_match_and_capacity_doubles(model_factory, backend):
    path = str(default_model_dir() or model_factory("llama", std=0.1))
    prompts = ["The Python language is", "A list is", "To open a file, you", "Strings are"] if default_model_dir() \
        else [list(range(3 + i, 40 + 7 * i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)
    outs, tokens = {}, {}
    for kv in ("auto", "int8"):
        llm = LLM(path, dtype="bfloat16", kv_cache_dtype=kv, kv_cache_gib=0.004, attention_backend=backend,
                  max_num_seqs=64)
        outs[kv] = llm.generate(prompts, params, use_tqdm=False)
        tokens[kv] = llm.engine.kv.num_usable_blocks
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_usable_blocks
    assert tokens["int8"] / tokens["auto"] > 1.9  # bf16 K/V -> int8 + one bf16 scale per 64+ values
    assert check_logprobs_close(outs["int8"], outs["auto"]) >= 0.5


def test_kv_cache_dtype_is_validated(llama_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(llama_dir), kv_cache_dtype="fp4")
