"""A small LoRA task for the embedded default model: answer "Convert to JSON: name=... age=... city=..."
with the JSON object, in the default model's chat format. Writes train/eval JSONL, then (with --check)
reports how many held-out prompts the base model and an adapter answer exactly.

    python recipes/lora_json.py data/lora_json                 # the data
    ember train recipes/lora_json.yaml                           # the adapter (runs/lora_json)
    python recipes/lora_json.py data/lora_json --check runs/lora_json/checkpoints/final/adapter
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Alice", "Bob", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kai", "Lena", "Mika",
         "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Vik", "Wen", "Xena", "Yuri", "Zoe"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Seoul", "Tunis", "Vienna", "Kyiv", "Accra"]
SYSTEM = "You are ember, a small assistant trained on the Python documentation."


def example(rng: random.Random) -> tuple[str, str]:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
    prompt = f"Convert to JSON: name={name} age={age} city={city}"
    return prompt, json.dumps({"name": name, "age": age, "city": city})


def render(prompt: str, answer: str | None) -> str:
    text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")
    return text if answer is None else text + answer + "<|im_end|>\n"


def write(out: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 400), ("eval", 40)):
        with (out / f"{split}.jsonl").open("w") as f:
            for _ in range(count):
                f.write(json.dumps({"text": render(*example(rng))}) + "\n")


def check(adapter: str | None, count: int = 40, seed: int = 1) -> None:
    from ember import LLM, SamplingParams
    from ember.engine.lora import LoRARequest

    rng = random.Random(seed)
    pairs = [example(rng) for _ in range(count)]
    llm = LLM(enable_lora=True, max_lora_rank=64)
    params = SamplingParams(temperature=0, max_tokens=40, stop=["<|im_end|>"])
    prompts = [render(p, None) for p, _ in pairs]
    for name, lora in (("base model", None), ("adapter", LoRARequest("json", 1, adapter) if adapter else None)):
        if name == "adapter" and lora is None:
            continue
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
        answers = [_parse(o.outputs[0].text) for o in outs]
        exact = sum(a == json.loads(want) for a, (_, want) in zip(answers, pairs))
        shaped = sum(a is not None and set(a) == {"name", "age", "city"} for a in answers)
        fields = sum(a is not None and a.get(k) == v for a, (_, want) in zip(answers, pairs)
                     for k, v in json.loads(want).items())
        print(f"{name}: {shaped}/{count} answers in the JSON shape, {fields}/{3 * count} fields right, "
              f"{exact}/{count} exact; e.g. {outs[0].outputs[0].text!r}")


def _parse(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--check", metavar="ADAPTER", default=None)
    args = parser.parse_args()
    if args.check:
        check(args.check)
    else:
        write(args.out)
