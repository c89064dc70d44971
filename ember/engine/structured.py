"""Structured output: JSON schema, regex, choice and EBNF grammars through xgrammar.

A request's grammar is compiled once per distinct spec (xgrammar caches compiled
grammars) when the request is validated, so an invalid schema is an error before any
work, and the engine loop never waits on a compile. Each request then owns a
GrammarMatcher; every step it fills that request's row of a token bitmask, applied to
the logits in the sampler, and accepts the sampled token.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from ember.engine.request import StructuredOutput


__all__ = ["GrammarCompiler", "StructuredOutput"]


def _choice_grammar(choices: tuple[str, ...]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarCompiler:
    """xgrammar for one tokenizer; thread-safe, with compiled grammars cached by spec."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr

        backend = tokenizer.hf.to_str()
        try:
            metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend)
            vocab_type, prefix_space = metadata["vocab_type"], metadata["add_prefix_space"]
        except Exception:  # an older/newer xgrammar: byte-level BPE is the common case
            vocab_type, prefix_space = xgr.VocabType.BYTE_LEVEL, False
        vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
        encoded = [""] * vocab_size
        for token, index in vocab.items():
            if index < vocab_size:
                encoded[index] = token
        info = xgr.TokenizerInfo(encoded, vocab_type, vocab_size=vocab_size,
                                 stop_token_ids=list(tokenizer.eos_token_ids) or None, add_prefix_space=prefix_space)
        self.xgr = xgr
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        # JSON forbids raw control characters in strings, but xgrammar's length-bounded string
        # rules let them through: JSON outputs also ban every token holding a byte below 0x20
        # (compact JSON never needs one).
        banned = torch.tensor([any(b < 0x20 for b in piece) for piece in info.decoded_vocab], dtype=torch.bool)
        # as an allowed-token bitmask row (xgrammar's format: bit j of word w is token 32w + j)
        allowed = torch.ones(self.xgr.get_bitmask_shape(1, vocab_size)[1] * 32, dtype=torch.bool)
        allowed[:len(banned)] = ~banned
        bits = (allowed.view(-1, 32).to(torch.int64) << torch.arange(32)).sum(1)
        self.json_allowed = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
        self._cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput):
        key = spec.key()
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        kind, text = key
        try:
            if kind == "json_schema":
                compiled = self.compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "json_object":  # an object, as OpenAI's json_object means (not any JSON value)
                compiled = self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind == "regex":
                compiled = self.compiler.compile_regex(text)
            elif kind == "choice":
                compiled = self.compiler.compile_grammar(_choice_grammar(spec.choice))
            else:
                compiled = self.compiler.compile_grammar(text)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError/InvalidJSONError with the reason
            field = {"json_schema": "response_format.json_schema", "regex": "structured.regex",
                     "grammar": "structured.grammar"}.get(kind, "structured")
            raise ValueError(f"{field}: cannot be compiled ({str(e).strip().splitlines()[0][:300]})") from None
        with self._lock:
            self._cache[key] = compiled
        return compiled

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def allowed_bitmask(self, spec: StructuredOutput) -> torch.Tensor | None:
        """An allowed-bitmask row to AND into a JSON request's grammar mask (None: nothing banned)."""
        return self.json_allowed if spec.key()[0] in ("json_schema", "json_object") else None

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int]) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=indices)
