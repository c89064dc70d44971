"""Training data: text/JSONL files (or parquet/arrow files and HF datasets: ember.train.hf_datasets)
-> token ids -> fixed-length packed sequences.

Documents are tokenized with the model's tokenizer, joined with EOS, and cut into
`seq_len + 1` windows (inputs and next-token labels). A JSONL record with a `messages`
list (a chat, OpenAI's shape) is rendered with the tokenizer's chat template, and only
its assistant turns are trained on (chat SFT): the other tokens get the label -100, which
the loss ignores. The order of sequences is a function of (seed, step) only, so a run
resumed on another world size sees the same global batches.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ember.train import hf_datasets
from ember.train.config import ConfigError, DataSpec
from ember.train.hf_datasets import DatasetSource

TRAINED_BIT, START_BIT = 31, 30  # a packed token's flags above its id: trained on, first of its document


def expand_files(patterns: tuple[str, ...], section: str) -> list[Path | DatasetSource]:
    """Text and JSONL files as Paths; parquet/arrow files, save_to_disk directories and `hf:` Hub ids as
    DatasetSources (ember.train.hf_datasets)."""
    files: list[Path | DatasetSource] = []
    for pattern in patterns:
        if pattern.startswith(hf_datasets.HUB_PREFIX):
            files.append(hf_datasets.hub_dataset(pattern, section))
            continue
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        found: list[Path | DatasetSource] = []
        for path in map(Path, matches):
            if path.is_file():
                found.append(hf_datasets.table_file(path, section) if path.suffix in hf_datasets.TABLE_BUILDERS
                             else path)
            elif hf_datasets.is_saved_dataset(path):
                found.append(hf_datasets.saved_dataset(path, section))
        if not found:
            raise ConfigError(f"{section}: {pattern!r} matches no file")
        files += found
    return files


def source_key(source: Path | DatasetSource) -> str:
    """What a source's tokens depend on: a file's path, size and mtime; a dataset's fingerprint."""
    if isinstance(source, DatasetSource):
        return source.key()
    stat = source.stat()
    return f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    """("FILE:LINE", record) for each non-empty line of a JSONL file."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not valid JSON ({e})") from None


def read_documents(files: list[Path | DatasetSource], text_field: str
                   ) -> Iterator[str | list[dict] | tuple[str, str]]:
    """Each document's text, a chat record's list of messages, or a (prompt, completion) pair."""
    for path in files:
        if isinstance(path, DatasetSource):
            records = path.records()  # each row as a JSONL record
        elif path.suffix != ".jsonl":
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        else:
            records = read_jsonl(path)
        for where, record in records:
            if isinstance(record, dict) and isinstance(record.get("messages"), list):
                _check_messages(record["messages"], where)
                yield record["messages"]
            elif isinstance(record, dict) and isinstance(record.get("prompt"), str) \
                    and isinstance(record.get("completion"), str):
                yield record["prompt"], record["completion"]
            elif isinstance(record, dict) and isinstance(record.get(text_field), str):
                yield record[text_field]
            else:
                raise ConfigError(f"{where}: no string field {text_field!r} (or a 'messages' list)")


def _check_messages(messages: list, where: str) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: messages[{i}] needs a string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: the conversation has no assistant message to train on")


def chat_tokens(tokenizer, messages: list[dict], loss_on: str = "assistant", from_message: int = 0
                ) -> tuple[list[int], list[int]]:
    """A conversation through the chat template -> (token ids, 1 for the assistant turns' tokens, else 0;
    `loss_on` "last_turn": the last assistant turn's only, "all": every token; turns before
    `from_message` are never trained on: a preference pair's prompt). Assistant spans are found
    in the text (each turn's rendering must extend the previous one's, as chat templates do) and mapped
    to tokens by their character offsets."""
    text = tokenizer.apply_chat_template(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < from_message:
            continue
        before = tokenizer.apply_chat_template(messages[:i], True) if i else ""
        through = tokenizer.apply_chat_template(messages[:i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ConfigError("data: this chat template does not render a conversation as a prefix of its longer "
                              "versions, so the assistant turns cannot be located; give plain 'text' records")
        spans.append((len(before), len(through)))
    if loss_on == "last_turn":
        spans = spans[-1:]
    return _masked(tokenizer, text, spans if loss_on != "all" else [(0, len(text))])


def completion_tokens(tokenizer, prompt: str, completion: str, loss_on: str = "assistant"
                      ) -> tuple[list[int], list[int]]:
    """A prompt/completion record -> (token ids of prompt + completion, 1 on the completion's tokens)."""
    text = prompt + completion
    return _masked(tokenizer, text, [(0 if loss_on == "all" else len(prompt), len(text))])


def _masked(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in encoding.offsets]
    return list(encoding.ids), mask


def tokenize_files(files: list[Path | DatasetSource], tokenizer, text_field: str, cache_dir: Path | None,
                   loss_on: str = "assistant") -> np.ndarray:
    """All documents' tokens, each followed by EOS (cached in cache_dir by content), and which tokens
    are trained on (see `trained_mask`)."""
    key = hashlib.sha256()
    for f in files:
        key.update(source_key(f).encode())
    key.update(tokenizer.hf.to_str().encode())
    key.update(text_field.encode())
    key.update(loss_on.encode())
    # v2: trained-token bit; v3: document-start bit
    cache = cache_dir / f"tokens-v3-{key.hexdigest()[:16]}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        return np.load(cache, mmap_mode="r")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pieces, masks = [], []
    for doc in read_documents(files, text_field):
        if isinstance(doc, (list, tuple)):
            ids, mask = chat_tokens(tokenizer, doc, loss_on) if isinstance(doc, list) else \
                completion_tokens(tokenizer, *doc, loss_on)
            ids, mask = ids + [eos], mask + mask[-1:]  # the EOS is learned where the document ends trained
        else:
            ids = tokenizer.encode(doc, add_special_tokens=False) + [eos]
            mask = [1] * len(ids)
        pieces.append(np.asarray(ids, dtype=np.uint32))
        masks.append(np.asarray(mask, dtype=np.uint8))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)
    lengths = np.asarray([len(p) for p in pieces], dtype=np.int64)
    starts = np.zeros(len(ids), dtype=np.uint32)
    starts[np.cumsum(lengths) - lengths] = 1
    # The mask and the document starts ride along as ids' two high bits (token ids stay below 2^30): one array.
    packed = ids | (mask.astype(np.uint32) << TRAINED_BIT) | (starts << START_BIT)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, packed)
        tmp.replace(cache)
    return packed


class PackedDataset:
    """Non-overlapping windows of seq_len + 1 tokens over one token stream; with `documents`, each row
    also says which document each input token belongs to (`data.packing: documents`)."""

    def __init__(self, ids: np.ndarray, seq_len: int, documents: bool = False):
        self.ids = ids
        self.seq_len = seq_len
        self.documents = documents

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1) // self.seq_len)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(inputs, labels): labels are -100 (ignored by the loss) where the token is not trained on.
        With documents: (inputs, labels, document_ids [B, T], counting from 0 in each row), and a
        document's first token is no label (nothing of its own document precedes it)."""
        T = self.seq_len
        rows = np.stack([np.asarray(self.ids[i * T:i * T + T + 1], dtype=np.int64) for i in indices])
        rows = torch.from_numpy(rows)
        trained = ((rows >> TRAINED_BIT) & 1).bool()
        starts = ((rows >> START_BIT) & 1).bool()
        rows = rows & ((1 << START_BIT) - 1)
        if not self.documents:
            return rows[:, :-1], torch.where(trained[:, 1:], rows[:, 1:], -100)
        labels = torch.where(trained[:, 1:] & ~starts[:, 1:], rows[:, 1:], -100)
        documents = starts[:, :-1].long().cumsum(1)
        return rows[:, :-1], labels, documents - documents[:, :1]


def build_datasets(spec: DataSpec, tokenizer, cache_dir: Path | None) -> tuple[PackedDataset, PackedDataset | None]:
    train_ids = tokenize_files(expand_files(spec.train, "data.train"), tokenizer, spec.text_field, cache_dir,
                               spec.loss_on)
    if spec.eval:
        eval_ids = tokenize_files(expand_files(spec.eval, "data.eval"), tokenizer, spec.text_field, cache_dir,
                                  spec.loss_on)
    else:
        cut = int(len(train_ids) * (1 - spec.eval_fraction)) if spec.eval_fraction > 0 else len(train_ids)
        train_ids, eval_ids = train_ids[:cut], train_ids[cut:]
    documents = spec.packing == "documents"
    train = PackedDataset(train_ids, spec.seq_len, documents)
    if len(train) == 0:
        raise ConfigError(f"data.train: {len(train_ids)} tokens do not make one sequence of seq_len {spec.seq_len}")
    evaluation = PackedDataset(eval_ids, spec.seq_len, documents)
    return train, evaluation if len(evaluation) else None


class StepSampler:
    """Which sequences make global batch `step`: epochs are seeded permutations."""

    def __init__(self, num_sequences: int, global_batch: int, seed: int):
        self.n = num_sequences
        self.global_batch = global_batch
        self.seed = seed
        self._epoch = -1
        self._order: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._order

    def global_indices(self, step: int) -> np.ndarray:
        start = step * self.global_batch
        out = []
        for position in range(start, start + self.global_batch):
            out.append(self._permutation(position // self.n)[position % self.n])
        return np.asarray(out)

    def micro_batch(self, step: int, rank: int, world: int, micro: int, micro_size: int, accum: int) -> np.ndarray:
        """Rank r takes its contiguous share of the global batch; micro-batch m a slice of that."""
        indices = self.global_indices(step)
        per_rank = micro_size * accum
        share = indices[rank * per_rank:(rank + 1) * per_rank]
        return share[micro * micro_size:(micro + 1) * micro_size]
