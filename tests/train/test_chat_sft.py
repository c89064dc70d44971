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
