"""Data for ember's embedded default model (recipes/default.yaml).

Corpus: the reStructuredText sources of the Python 3.11 documentation as Debian ships them
(`apt-get install python3.11-doc`, /usr/share/doc/python3.11/html/_sources; PSF License),
turned into plain prose, plus a small chat set made from the same documents: the glossary
("What is X?" -> its definition) and the FAQs (question -> first paragraph of the answer),
rendered with the chat template. A byte-level BPE tokenizer is trained on the result.

    python recipes/prepare_default.py data/default
writes data/default/{train.jsonl, eval.jsonl, tokenizer/}.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SOURCE = Path("/usr/share/doc/python3.11/html/_sources")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYSTEM = "You are ember, a small assistant trained on the Python documentation."

_ROLE = re.compile(r":[a-zA-Z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_+")
_EMPH = re.compile(r"\*\*?([^*\n]+)\*\*?")
_UNDERLINE = re.compile(r"^[=\-~^\"'`#*+.]{3,}\s*$")


def clean_inline(text: str) -> str:
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    return text.replace("\\", "")


_DROP = {"index", "toctree", "only", "highlight", "tabularcolumns", "sectionauthor", "moduleauthor", "raw", "image",
         "figure", "literalinclude", "testsetup", "testcleanup", "include", "csv-table", "list-table", "table",
         "productionlist", "audit-event", "availability", "impl-detail", "opcode", "2to3fixer", "pdbcommand",
         "cmdoption", "envvar", "describe", "program", "currentmodule", "default-domain", "c:function", "c:type",
         "c:member", "c:macro", "c:var"}
_DIRECTIVE = re.compile(r"\.\. ([a-zA-Z0-9:_-]+)::\s*(.*)")


def rst_to_text(source: str) -> str:
    """Prose, signatures and code of one .rst file; labels, indexes, tables and markup dropped."""
    out, skip_indent = [], None
    for line in source.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                continue
        if stripped.startswith(".. "):
            directive = _DIRECTIVE.match(stripped)
            if directive is None or directive.group(1) in _DROP:
                skip_indent = indent  # a comment, a label or a directive without prose: drop its block
            elif directive.group(2):  # function::, class::, note:: ...: keep the signature and the body
                out.append(clean_inline(directive.group(2)))
            continue
        if stripped.startswith(":") and stripped.count(":") >= 2 and indent > 0:
            continue  # directive options (:noindex:, :synopsis: ...)
        if _UNDERLINE.match(stripped) or stripped.startswith(("+--", "|", "==")):
            continue
        out.append(clean_inline(line[min(indent, 3):].rstrip()).replace("::", ":"))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def glossary_pairs(source: str) -> list[tuple[str, str]]:
    pairs = []
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("   ") and not line.startswith("      ") and line.strip() and i + 1 < len(lines) \
                and lines[i + 1].startswith("      "):
            term = clean_inline(line.strip())
            body = []
            for follow in lines[i + 1:]:
                if follow.strip() and not follow.startswith("      "):
                    break
                body.append(follow.strip())
            definition = clean_inline(" ".join(" ".join(body).split()))
            if term and definition and not term.startswith(".."):
                pairs.append((f"What is {term} in Python?", definition.split("  ")[0]))
    return pairs


def faq_pairs(source: str) -> list[tuple[str, str]]:
    pairs = []
    blocks = re.split(r"\n(?=[^\n]+\n[-=^~]{3,}\n)", source)
    for block in blocks:
        lines = block.strip().splitlines()
        if len(lines) < 3 or not lines[0].rstrip().endswith("?"):
            continue
        body = rst_to_text("\n".join(lines[2:]))
        answer = body.split("\n\n")[0].replace("\n", " ").strip()
        if 40 < len(answer) < 1200:
            pairs.append((clean_inline(lines[0].strip()), answer))
    return pairs


def chat_text(question: str, answer: str) -> str:
    messages = [("system", SYSTEM), ("user", question), ("assistant", answer)]
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--source", default=str(SOURCE))
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    source, out = Path(args.source), Path(args.out_dir)
    if not source.is_dir():
        raise SystemExit(f"{source} is missing: apt-get install python3.11-doc")
    out.mkdir(parents=True, exist_ok=True)

    documents, chats = [], []
    for path in sorted(source.rglob("*.rst.txt")):
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = rst_to_text(raw)
        if len(text) > 200:
            documents.append(text)
        if path.name == "glossary.rst.txt":
            chats += glossary_pairs(raw)
        if path.parent.name == "faq":
            chats += faq_pairs(raw)
    records = [{"text": d} for d in documents] + [{"text": chat_text(q, a)} for q, a in chats] * 4
    random.Random(0).shuffle(records)
    cut = max(1, len(records) // 50)
    for name, part in (("eval.jsonl", records[:cut]), ("train.jsonl", records[cut:])):
        with (out / name).open("w") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(documents)} documents, {len(chats)} chat pairs -> {out}")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((r["text"] for r in records), trainer=trainer)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 1024,
    }, indent=2))
    ids = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    (tok_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}, indent=2))
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens -> {tok_dir}")


if __name__ == "__main__":
    main()
