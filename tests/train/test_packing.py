"""`data.packing: documents`: each document packed into a window is trained as if alone (its own
positions, attention only within itself)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ember.models import load_model
from ember.tokenizer import Tokenizer
from ember.train.config import DataSpec
from ember.train.data import build_datasets
from tests.train.conftest import losses, train, write_config


def _documents(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g) for n in lengths]


def _packed_row(docs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One window holding `docs` whole: (inputs, labels: -100 where the next token starts a document, ids)."""
    inputs = torch.cat(docs)
    ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])
    labels = torch.full_like(inputs, -100)
    same = ids[1:] == ids[:-1]
    labels[:-1] = torch.where(same, inputs[1:], -100)
    return inputs, labels, ids


def _alone(model, doc: torch.Tensor) -> torch.Tensor:
    """log p of doc[1:] given its own prefix, in a forward of its own."""
    return model(doc[None, :-1], labels=doc[None, 1:])[0]


# Qwen2: biases, tied embeddings; Mistral: a window shorter than the documents; Gemma 2: soft-capped
# logits over a window; gpt-oss: sinks (attention_math); GPT-2: learned positions.
ARCHS = [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 8}), ("gemma2", {"sliding_window": 8}),
         ("gpt_oss", {}), ("gpt2", {})]


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=[a for a, _ in ARCHS])
def test_each_document_gets_its_own_logprobs(model_factory, arch, overrides):
    model, _ = load_model(model_factory(arch, std=0.1, **overrides), dtype="float32")
    model.eval()
    rows = [_documents([11, 17, 9], seed=1), _documents([20, 17], seed=2), _documents([37], seed=3)]
    packed = [_packed_row(docs) for docs in rows]
    inputs, labels, ids = (torch.stack(t) for t in zip(*packed))
    with torch.no_grad():
        logps = model(inputs, labels=labels, document_ids=ids)
        stream = model(inputs, labels=labels)
        for r, docs in enumerate(rows):
            start = 0
            for doc in docs:
                alone = _alone(model, doc)
                torch.testing.assert_close(logps[r, start:start + len(doc) - 1], alone, atol=1e-5, rtol=0)
                assert logps[r, start + len(doc) - 1] == 0  # (the next document's first token: no label)
                start += len(doc)
    assert not torch.allclose(logps[:2], stream[:2], atol=1e-3)  # stream packing attends across documents
    torch.testing.assert_close(logps[2], stream[2], atol=1e-5, rtol=0)  # one document: the same forward


def test_dataset_marks_documents_and_loss_equals_separate_runs(model_factory, tmp_path):
    """A packed batch's trainer loss is the documents' losses run one by one, weighted per token; the
    first window's leading piece (a document's tail) counts as a document of its own."""
    from ember.train.config import TrainConfig
    from ember.train.trainer import Trainer

    path = model_factory("llama", std=0.1)
    tokenizer = Tokenizer(path)
    data = tmp_path / "docs.jsonl"
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "near", "old", "harbour"]
    rng = np.random.default_rng(0)
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 14)))}) + "\n"
                            for _ in range(60)))
    spec = DataSpec(train=(str(data),), seq_len=40, eval_fraction=0.0, packing="documents")
    train_set, _ = build_datasets(spec, tokenizer, None)
    inputs, labels, ids = train_set.batch(np.arange(4))
    stream_inputs, stream_labels = build_datasets(DataSpec(train=(str(data),), seq_len=40, eval_fraction=0.0),
                                                  tokenizer, None)[0].batch(np.arange(4))
    assert torch.equal(inputs, stream_inputs) and int(inputs.max()) < tokenizer.vocab_size
    assert (ids[:, -1] > 0).all() and (ids[:, 0] == 0).all()  # several documents in each window
    eos = tokenizer.eos_token_id
    # a document starts after each EOS, and its first token is no label
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    assert (inputs[:, :-1][starts[:, 1:]] == eos).all() and (labels[:, :-1][starts[:, 1:]] == -100).all()
    assert torch.equal(labels != -100, (stream_labels != -100) & ~torch.cat([starts[:, 1:], labels[:, -1:] == -100], 1))

    trainer = Trainer(TrainConfig.from_dict({"model": {"path": str(path)}, "data": {"train": [str(data)]}}))
    trainer.model, _ = load_model(path, dtype="float32")
    trainer.d = type("D", (), {"device": torch.device("cpu")})()
    trainer.moe_layers = []
    with torch.no_grad():
        packed = trainer._loss((inputs, labels, ids)).item()
        total, count = 0.0, 0
        for r in range(len(inputs)):
            for d in ids[r].unique():
                piece = ids[r] == d
                alone = trainer.model(inputs[r][piece][None], labels=labels[r][piece][None])
                total -= alone.sum().item()
                count += int((labels[r][piece] != -100).sum())
    assert abs(packed - total / count) < 1e-5


@pytest.mark.slow
def test_packing_documents_trains(train_assets, tmp_path):
    data = tmp_path / "docs.jsonl"
    lines = [line for line in (train_assets / "train.txt").read_text().splitlines() if line.strip()]
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    config = write_config(tmp_path, train_assets, data={"train": [str(data)], "seq_len": 32, "packing": "documents"},
                          max_steps=12, activation_checkpointing=True)
    records = train(config)
    assert all(np.isfinite(r["loss"]) for r in records)
    assert losses(records)[12] < losses(records)[1]
