"""Chat SFT: `messages` records are rendered with the chat template and only the assistant turns are trained on."""

from __future__ import annotations

import json

import numpy as np

from ember.tokenizer import Tokenizer
from ember.train.config import DataSpec
from ember.train.data import build_datasets, chat_tokens
from tests.train.conftest import losses, train, write_config

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six."}]


def test_only_assistant_turns_are_trained_on(train_assets, tmp_path):
    tokenizer = Tokenizer(train_assets / "tok")
    ids, mask = chat_tokens(tokenizer, CHAT)
    assert ids == tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "Four.<|im_end|>\nSix.<|im_end|>\n"
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(40)) + "\n")
    train_set, _ = build_datasets(DataSpec(train=(str(data),), seq_len=32, eval_fraction=0.0), tokenizer, None)
    inputs, labels = train_set.batch(np.arange(len(train_set)))
    kept = labels[labels != -100]
    assert 0 < len(kept) < labels.numel() / 2  # the prompts (most of each chat) are not labels
    assert int(inputs.max()) < tokenizer.vocab_size  # the trained-token bit never leaks into the ids


def test_chat_sft_trains(train_assets, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(200)) + "\n")
    records = train(write_config(tmp_path, train_assets, data={"train": [str(data)], "seq_len": 32}, max_steps=12))
    assert all(np.isfinite(r["loss"]) for r in records)
    assert losses(records)[12] < losses(records)[1]


def test_loss_on_and_prompt_completion_records(train_assets, tmp_path):
    from ember.train.data import completion_tokens

    tokenizer = Tokenizer(train_assets / "tok")
    _, last = chat_tokens(tokenizer, CHAT, "last_turn")
    ids, everything = chat_tokens(tokenizer, CHAT, "all")
    assert tokenizer.decode([t for t, m in zip(ids, last) if m], skip_special_tokens=False) == "Six.<|im_end|>\n"
    assert all(everything)
    ids, mask = completion_tokens(tokenizer, "Q: two plus two? A:", " four")
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == " four"
    data = tmp_path / "pc.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "Q: two plus two? A:", "completion": " four"})
                              for _ in range(100)) + "\n")
    records = train(write_config(tmp_path, train_assets, data={"train": [str(data)], "seq_len": 32}, max_steps=3))
    assert all(0 < r["trained_tokens"] < 8 * 32 / 2 for r in records)  # the completions (and EOS), reported


def test_masked_loss_equals_transformers(model_factory, tmp_path):
    """The trainer's loss on a chat batch equals transformers' loss with the same labels (-100 masked)."""
    import torch

    from ember.models import load_model
    from ember.train.config import TrainConfig
    from ember.train.trainer import Trainer
    from tests.conftest import load_hf

    path = model_factory("llama", std=0.1)
    tokenizer = Tokenizer(path)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(20)) + "\n")
    train_set, _ = build_datasets(DataSpec(train=(str(data),), seq_len=48, eval_fraction=0.0), tokenizer, None)
    inputs, labels = train_set.batch(np.arange(min(4, len(train_set))))
    trainer = Trainer(TrainConfig.from_dict({"model": {"path": str(path)}, "data": {"train": [str(data)]}}))
    trainer.model, _ = load_model(path, dtype="float32")
    trainer.d = type("D", (), {"device": torch.device("cpu")})()
    trainer.moe_layers = []
    with torch.no_grad():
        ours = trainer._loss((inputs, labels)).item()
        hf_logits = load_hf(path)(inputs).logits.float()
        theirs = torch.nn.functional.cross_entropy(hf_logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()
    assert abs(ours - theirs) < 1e-5
