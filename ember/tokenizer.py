"""Tokenizer: `tokenizer.json` through the `tokenizers` library, HF chat templates
through jinja2, and an incremental detokenizer for streaming.

Reads the files transformers writes: tokenizer.json, tokenizer_config.json
(special tokens, chat template), chat_template.jinja, generation_config.json; or a GGUF's
vocabulary metadata (tokenizer_gguf.py).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


# chat-template variables a request sets through its own fields, never through chat_template_kwargs
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt"})


def check_text(text: str, field: str) -> None:
    """Text that is not valid Unicode (a lone surrogate from JSON's \\ud800) is bad input."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field}: not valid text (a lone surrogate {text[e.start]!r} at character "
                         f"{e.start})") from None


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_env() -> jinja2.Environment:
    # The same environment transformers renders chat templates in.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    def __init__(self, source: str | Path, chat_template: str | None = None):
        """`source`: an HF model directory, or a GGUF file (or a directory holding one), whose
        metadata carries the vocabulary (see tokenizer_gguf.py)."""
        from ember.models.gguf import find_gguf, open_gguf

        gguf_file = find_gguf(source)
        if gguf_file is not None:
            from ember.tokenizer_gguf import gguf_tokenizer

            self.hf, self.special_tokens, eos_ids, template = gguf_tokenizer(open_gguf(gguf_file))
        else:
            self.hf, self.special_tokens, eos_ids, template = self._from_dir(Path(source))
        # Some tokenizer.json files carry padding/truncation settings (e.g. sentence-transformers'):
        # ember decides lengths itself.
        self.hf.no_padding()
        self.hf.no_truncation()
        self.bos_token_id = self._id(self.special_tokens["bos"])
        self.eos_token_ids = eos_ids
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.chat_template = chat_template or template
        self._compiled_template: jinja2.Template | None = None

    @classmethod
    def _from_dir(cls, model_dir: Path):
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"model: {str(model_dir)!r} has no tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception
            raise ValueError(f"{path}: cannot be read as a tokenizer ({e})") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")
        model_config = _read_json(model_dir / "config.json")
        special = {key: _token_text(config.get(f"{key}_token")) for key in ("bos", "eos", "unk", "pad")}
        eos_ids: list[int] = []
        eos_token = hf.token_to_id(special["eos"]) if special["eos"] is not None else None
        for source in (generation.get("eos_token_id"), model_config.get("eos_token_id"), eos_token):
            for i in source if isinstance(source, list) else [source]:
                if i is not None and i not in eos_ids:
                    eos_ids.append(int(i))
        return hf, special, eos_ids, cls._find_chat_template(model_dir, config)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @staticmethod
    def _find_chat_template(model_dir: Path, config: dict) -> str | None:
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """An upper bound on the characters one token stands for (a text longer than
        max_model_len times this cannot fit), from the vocabulary's longest entry."""
        return max(16, max((len(t.encode("utf-8")) for t in self.hf.get_vocab(with_added_tokens=True)), default=0))

    def encode(self, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
        check_text(text, field)
        # encode_batch releases the GIL (encode does not): a long prompt tokenized on a worker
        # thread leaves the server's event loop free
        return self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        if self.chat_template is None:
            raise ValueError("chat_template: the model has none; pass one (e.g. --chat-template FILE)")
        if self._compiled_template is None:
            try:
                self._compiled_template = _template_env().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"chat_template: invalid jinja template ({e})") from None
        context = {f"{k}_token": v for k, v in self.special_tokens.items()}
        context.update(kwargs, messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
        try:
            return self._compiled_template.render(**context)
        except jinja2.TemplateError as e:
            raise ValueError(f"messages: the chat template rejected them ({e})") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # odd values the template chokes on
            raise ValueError(f"messages: the chat template failed on them ({type(e).__name__}: {e})") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template already writes any BOS token, so none is added here.
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False, field="messages")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that are never broken UTF-8.

    Decoding starts from a few prompt tokens of context so tokenizers that drop a
    word's leading space at the start of a string (SentencePiece) get it right.
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(
            ids=list(prompt_ids[-self.CONTEXT_TOKENS:]), skip_special_tokens=skip_special_tokens
        )

    def step(self, token_id: int) -> str:
        return self.stream.step(self.tokenizer.hf, token_id) or ""
