"""A GGUF model in ember against transformers loading the same file (dequantized to fp32): prompt
token ids, greedy continuations, and teacher-forced agreement and loss on held-out text.

`ember bench gguf --model FILE.gguf` prints the figures; the slow tests hold them to the bars of
issue 20. transformers is the reference (a test dependency, never needed at run time).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

# Twenty varied prompts: prose, code, facts, and chat-templated questions (the chat flag).
PROMPTS: list[tuple[str, bool]] = [
    ("The history of the printing press begins", False),
    ("Once upon a time, in a village by the sea,", False),
    ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("import numpy as np\n\n# compute the mean of each row of a matrix\n", False),
    ("The three primary colors are", False),
    ("SELECT name, age FROM users WHERE", False),
    ("Photosynthesis is the process by which", False),
    ("for (int i = 0; i < n; ++i) {", False),
    ("The capital of Japan is Tokyo. The capital of Italy is", False),
    ("A haiku about autumn:\n", False),
    ("<!DOCTYPE html>\n<html>\n<head>\n", False),
    ("In 1969, the first humans", False),
    ("What is the capital of France?", True),
    ("Write a Python function that checks whether a string is a palindrome.", True),
    ("Explain gravity to a ten-year-old in two sentences.", True),
    ("Give me three tips for sleeping better.", True),
    ("What is 17 times 23?", True),
    ("Translate 'good morning' into Spanish and French.", True),
    ("Summarize the plot of Romeo and Juliet in one sentence.", True),
    ("List the planets of the solar system in order.", True),
]


@dataclass
class Parity:
    prompts: int
    prompt_ids_equal: int
    identical: int  # greedy continuations token for token
    within_top5: int  # the others: where they part, each side's token is in the other's top 5
    divergences: list[str]


def _load_reference(path: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def _reference_ids(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    return tokenizer.encode(text)


@contextlib.contextmanager
def integer_kernels_for_every_row():
    """Quantized layers take every row through ember's integer kernels (not only decode-sized
    batches), so teacher forcing over a long text measures what decoding computes."""
    from ember.models import quant

    saved = quant.KERNEL_MAX_ROWS
    quant.KERNEL_MAX_ROWS = 1 << 30
    try:
        yield
    finally:
        quant.KERNEL_MAX_ROWS = saved


def greedy_parity(path: Path, max_tokens: int = 64, prompts=PROMPTS, dtype: str = "float32") -> Parity:
    """ember's engine (activations in `dtype`) and transformers' generate (fp32), greedy, on each prompt."""
    from ember import LLM, SamplingParams

    reference, hf_tokenizer = _load_reference(path)
    llm = LLM(str(path), dtype=dtype)
    tok = llm.engine.tokenizer
    equal = identical = close = 0
    divergences = []
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for text, chat in prompts:
        ids = tok.encode_chat([{"role": "user", "content": text}]) if chat else tok.encode(text)
        equal += ids == list(_reference_ids(hf_tokenizer, text, chat))
        ours = llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids
        with torch.inference_mode():
            theirs = reference.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        if ours == theirs:
            identical += 1
            continue
        at = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        with torch.inference_mode():
            logits = reference(torch.tensor([ids + theirs[:at]])).logits[0, -1]
        top5 = logits.topk(5).indices.tolist()
        close += ours[at] in top5 and theirs[at] in top5
        divergences.append(f"{text[:40]!r}: token {at} ({ours[at]} vs {theirs[at]}; in reference top-5: {ours[at] in top5})")
    return Parity(len(prompts), equal, identical, close, divergences)


@dataclass
class TeacherForced:
    tokens: int
    top1_agreement: float
    ember_loss: float
    reference_loss: float


def heldout_ids(tokenizer, path: Path, tokens: int) -> list[int]:
    ids: list[int] = []
    for line in path.read_text().splitlines():
        ids += tokenizer.encode(json.loads(line)["text"], add_special_tokens=False)
        if len(ids) > tokens:
            break
    return ids[: tokens + 1]


def teacher_forced(path: Path, text_file: Path, tokens: int = 1000, chunk: int = 250,
                   dtype: str = "float32") -> TeacherForced:
    """Next-token argmax agreement and loss of ember (quantized layers on their integer kernels) against
    the dequantized fp32 reference, over `tokens` tokens of held-out text in chunks of `chunk`."""
    from ember.models import load_model
    from ember.tokenizer import Tokenizer

    reference, _ = _load_reference(path)
    model, _ = load_model(path, dtype=dtype)
    ids = heldout_ids(Tokenizer(path), text_file, tokens)
    agree, ours_nll, theirs_nll, count = 0, 0.0, 0.0, 0
    with torch.inference_mode(), integer_kernels_for_every_row():
        for start in range(0, len(ids) - 1, chunk):
            x = torch.tensor([ids[start:start + chunk + 1]])
            inputs, targets = x[:, :-1], x[0, 1:]
            ours = model(inputs)[0].float()
            theirs = reference(inputs).logits[0].float()
            agree += (ours.argmax(-1) == theirs.argmax(-1)).sum().item()
            ours_nll += torch.nn.functional.cross_entropy(ours, targets, reduction="sum").item()
            theirs_nll += torch.nn.functional.cross_entropy(theirs, targets, reduction="sum").item()
            count += len(targets)
    return TeacherForced(count, agree / count, ours_nll / count, theirs_nll / count)


def report(path: Path, text_file: Path, tokens: int, dtype: str = "float32") -> str:
    parity = greedy_parity(path, dtype=dtype)
    forced = teacher_forced(path, text_file, tokens, dtype=dtype)
    lines = [
        f"prompt token ids equal to transformers': {parity.prompt_ids_equal}/{parity.prompts}",
        f"greedy 64 tokens identical: {parity.identical}/{parity.prompts}; the rest parted within each other's "
        f"top-5: {parity.within_top5}/{parity.prompts - parity.identical}",
        *[f"  {d}" for d in parity.divergences],
        f"teacher-forced over {forced.tokens} held-out tokens: top-1 agreement {forced.top1_agreement:.4f}; "
        f"loss ember {forced.ember_loss:.4f} vs dequantized fp32 {forced.reference_loss:.4f} nats/token "
        f"(change {forced.ember_loss - forced.reference_loss:+.4f}, perplexity {math.exp(forced.ember_loss):.2f})",
    ]
    return "\n".join(lines)
