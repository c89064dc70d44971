"""A GGUF's vocabulary metadata as a `tokenizers.Tokenizer` that splits text as llama.cpp does.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`, token
types, scores), the BPE merges, the special token ids, whether to add BOS, and the name of the
pre-tokenizer its merges were learned with (`tokenizer.ggml.pre`), whose split rules live in
llama.cpp's code. Two vocabulary kinds cover the models people run:
- "gpt2": byte-level BPE. The text is split by the pre-tokenizer's rules (each regex isolates its
  matches in turn, as llama.cpp applies its list), bytes spelled in GPT-2's alphabet, then merged.
- "llama": SentencePiece BPE. Spaces become U+2581 ("▁"), one more goes in front of the text and
  after every special token when `add_space_prefix` is on, pieces merge in order of their scores,
  and characters outside the vocabulary fall back to byte tokens (<0x..>).
Control tokens (type 3) are special tokens, matched whole in the text and skipped when decoding;
user-defined ones (type 4) are matched whole and kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BUILDER_VERSION = 1  # part of the cache key: bump when what the builder makes changes
logger = logging.getLogger(__name__)

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_V3 = [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]

# tokenizer.ggml.pre -> the regexes llama.cpp splits with, applied in order (llama-vocab.cpp).
PRE_TOKENIZERS: dict[str, list[str]] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), [_LLAMA3]),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "kormo", "f2llmv2", "megrez"), [_QWEN2]),
    "qwen35": [_QWEN35],
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    [r"\p{N}", _GPT2]),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "trillion",
                     "granite-docling"), [_GPT2]),
    "tekken": [_TEKKEN],
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2", "kanana2", "talkie"), [_GPT4O]),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm"), _DEEPSEEK_V3),
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
}
# Pre-tokenizers whose words llama.cpp looks up whole before merging (as HF's `ignore_merges`).
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "glm4",
                  "tekken", "gpt-4o", "llama4", "minimax-m2", "kanana2", "talkie"}
# ...and those for which it adds BOS when the file does not say.
_ADD_BOS = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken"}


def _byte_level(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre: {pre!r} is a pre-tokenizer ember does not know "
                         f"(known: {', '.join(sorted(PRE_TOKENIZERS))}); give the model's tokenizer with --tokenizer DIR")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [(m[:cut], m[cut + 1:]) for m in merges if (cut := m.find(" ", 1)) > 0]  # as llama.cpp splits them
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(tokens: list[str], scores: list[float], types: list[int], unk: str | None,
                   add_space_prefix: bool, gemma: bool = False) -> HFTokenizer:
    if gemma:  # Gemma's files spell its runs-of-spaces pieces with real spaces: "▁" runs, as its tokenizer has them
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {token: i for i, token in enumerate(tokens)}
    mergeable = [i for i, t in enumerate(types) if t in (NORMAL, USER_DEFINED)]
    ranked = []  # (rank of the merged piece, its id, left id) for every split of every piece
    for i in mergeable:
        piece = tokens[i]
        rank = i if gemma else -scores[i]  # Gemma's pieces merge in file order (its scores do not follow it)
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left is not None and right is not None:
                ranked.append((rank, i, left, right))
    ranked.sort()
    merges = [(tokens[left], tokens[right]) for _, _, left, right in ranked]
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    spaces = [normalizers.Replace(" ", "\u2581")]
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), *spaces] if add_space_prefix else spaces)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    return tokenizer


def gguf_tokenizer(g) -> tuple[HFTokenizer, dict[str, str | None], list[int], str | None]:
    """(tokenizer, special token texts {bos, eos, unk, pad}, EOS ids, chat template) of a GGUFFile."""
    kind = g.get("tokenizer.ggml.model")
    tokens = g.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ValueError(f"{g.path}: the GGUF carries no tokenizer; give one with --tokenizer DIR")
    types = list(g.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))

    def token(key: str) -> str | None:
        i = g.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    cache = _cache_path(g)
    if cache is not None and cache.is_file():
        tokenizer = HFTokenizer.from_file(str(cache))
    else:
        started = time.perf_counter()
        print(f"building the tokenizer from {g.path.name}'s vocabulary ({len(tokens)} tokens; kept for later loads) ...",
              file=sys.stderr, flush=True)
        tokenizer = _build(g, kind, tokens, types, token)
        logger.info("tokenizer built in %.1f s", time.perf_counter() - started)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tokenizer.save(str(cache.with_suffix(".partial")))
                os.replace(cache.with_suffix(".partial"), cache)
            except OSError as e:  # a read-only home: build it again next time
                logger.warning("could not cache the tokenizer at %s (%s)", cache, e)
    special = {"bos": token("bos_token_id"), "eos": token("eos_token_id"), "unk": token("unknown_token_id"),
               "pad": token("padding_token_id")}
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        i = g.get(f"tokenizer.ggml.{key}")
        if i is not None and int(i) not in eos_ids:
            eos_ids.append(int(i))
    return tokenizer, special, eos_ids, g.get("tokenizer.chat_template")


def _build(g, kind: str, tokens: list[str], types: list[int], token) -> HFTokenizer:
    if kind == "gpt2":
        pre = g.get("tokenizer.ggml.pre") or "default"
        tokenizer = _byte_level(tokens, g.get("tokenizer.ggml.merges") or [], pre)
        add_bos_default = pre in _ADD_BOS
    elif kind == "llama":
        scores = list(g.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        tokenizer = _sentencepiece(tokens, scores, types, token("unknown_token_id"),
                                   bool(g.get("tokenizer.ggml.add_space_prefix", True)), gemma=g.arch.startswith("gemma"))
        add_bos_default = True
    else:
        raise ValueError(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported (gpt2, llama); "
                         "give the model's tokenizer with --tokenizer DIR")
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, ty in zip(tokens, types) if ty == CONTROL])
    # user-defined pieces match whole in the text; those respelled above (Gemma's space runs) are reached by
    # merging instead, as transformers does (adding them would give them new ids)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab])
    special = {"bos": token("bos_token_id"), "eos": token("eos_token_id")}
    _add_bos_eos(tokenizer, g, special, add_bos_default)
    return tokenizer


def _cache_path(g) -> Path | None:
    """Where this file's built tokenizer is kept: keyed by the file (path, size, mtime) and the builder."""
    try:
        stat = g.path.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{g.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{BUILDER_VERSION}".encode()).hexdigest()
    root = Path(os.environ.get("EMBER_CACHE") or Path.home() / ".cache" / "ember")
    return root / "gguf-tokenizers" / f"{key[:32]}.json"


def _add_bos_eos(tokenizer: HFTokenizer, g, special: dict[str, Any], add_bos_default: bool) -> None:
    """A post-processor adding BOS (and EOS) to encodings made with add_special_tokens, as the file says."""
    add = [("bos", bool(g.get("tokenizer.ggml.add_bos_token", add_bos_default))),
           ("eos", bool(g.get("tokenizer.ggml.add_eos_token", False)))]
    pieces = {key: special[key] for key, wanted in add if wanted and special[key] is not None}
    if not pieces:
        return
    template = " ".join(([pieces["bos"]] if "bos" in pieces else []) + ["$A"] + ([pieces["eos"]] if "eos" in pieces else []))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tokenizer.token_to_id(t)) for t in pieces.values()])
