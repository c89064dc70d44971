"""A DPO task for the embedded default model: of two JSON answers to "Convert to JSON: name=... age=...
city=...", prefer the one whose values are the prompt's (the rejected answer has one value changed).
Writes train/eval preference JSONL (TRL's conversational shape), then (with --check) measures on
held-out pairs how often the model prefers the chosen answer, for the base model and an adapter.

    python recipes/dpo_json.py data/dpo_json                    # the pairs
    ember train recipes/dpo_json.yaml                             # LoRA DPO (runs/dpo_json)
    python recipes/dpo_json.py data/dpo_json --check runs/dpo_json/checkpoints/final/adapter
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lora_json import CITIES, NAMES, SYSTEM, example


def pair(rng: random.Random) -> dict:
    prompt, answer = example(rng)
    wrong = json.loads(answer)
    field = rng.choice(["name", "age", "city"])
    if field == "age":
        wrong["age"] += rng.choice([-1, 1]) * rng.randint(1, 9)
    else:
        wrong[field] = rng.choice([v for v in (NAMES if field == "name" else CITIES) if v != wrong[field]])
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": json.dumps(wrong)}]}


def write(out: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 600), ("eval", 100)):
        with (out / f"{split}.jsonl").open("w") as f:
            for _ in range(count):
                f.write(json.dumps(pair(rng)) + "\n")


def check(data: Path, adapter: str | None) -> None:
    """Held-out preference accuracy: log p(chosen) > log p(rejected) under each model."""
    import torch

    from ember.models import load_model
    from ember.models.lora import merge_adapter
    from ember.registry import default_model_dir
    from ember.tokenizer import Tokenizer
    from ember.train.config import DataSpec
    from ember.train.dpo import build_pair_datasets, sequence_logps

    base = default_model_dir()
    tokenizer = Tokenizer(base)
    pairs, _ = build_pair_datasets(DataSpec(train=(str(data / "eval.jsonl"),), seq_len=128, eval_fraction=0.0),
                                   tokenizer, None)
    for name in ("base model", "adapter"):
        if name == "adapter" and adapter is None:
            continue
        model, _ = load_model(base, dtype="float32")
        if name == "adapter":
            merge_adapter(model, adapter)
        with torch.no_grad():
            inputs, labels, index = pairs.batch(range(len(pairs)))
            logps = sequence_logps(model.eval()(inputs, labels=labels), labels)
        b = len(index)
        wins = (logps[:b] > logps[b:]).float().mean().item()
        print(f"{name}: prefers the chosen answer on {wins:.1%} of {b} held-out pairs "
              f"(mean log-ratio {(logps[:b] - logps[b:]).mean().item():+.2f} nats)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--check", metavar="ADAPTER", nargs="?", const="", default=None)
    args = parser.parse_args()
    if args.check is not None:
        check(args.out, args.check or None)
    else:
        write(args.out)
