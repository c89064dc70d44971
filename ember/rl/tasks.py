"""Verifiable toy tasks for RL: prompts with an exactly checkable answer, over a digit vocabulary.

A prompt is "d1 d2 ... dn <task> " and the answer the transformed digits, then EOS.
The reward gives partial credit per correct digit (so a policy that is almost never
exactly right still gets a signal), and exact-match accuracy is reported separately.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DIGITS = [str(d) for d in range(10)]
SPECIALS = ["<eos>", "<pad>", "<reverse>", "<sort>", "<add>", "+", "="]


def write_task_tokenizer(out_dir: Path) -> None:
    """A character-level tokenizer over digits and task markers (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + DIGITS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.decoder = decoders.Fuse()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": vocab["<eos>"]}))


@dataclass
class Task:
    name: str  # reverse | sort | add
    length: int = 3

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """(prompt text, answer text)."""
        if self.name == "add":
            a, b = rng.randrange(10 ** self.length), rng.randrange(10 ** self.length)
            return f"{a}+{b}=", str(a + b)
        digits = "".join(rng.choice(DIGITS) for _ in range(self.length))
        answer = digits[::-1] if self.name == "reverse" else "".join(sorted(digits))
        return f"{digits}<{self.name}>", answer

    @staticmethod
    def reward(completion: str, answer: str) -> tuple[float, bool]:
        """(reward in [0, 1], exact match): 0.7 for the share of answer positions right, 0.3 more
        for the exact answer (which includes stopping right after it)."""
        exact = completion == answer
        right = sum(1 for a, b in zip(completion, answer) if a == b) / len(answer)
        return 0.7 * right + 0.3 * exact, exact
