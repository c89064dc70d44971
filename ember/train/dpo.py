"""Direct Preference Optimization: chosen/rejected pairs -> a loss on the policy's log-ratios.

Each record is a prompt with a preferred (`chosen`) and a dispreferred (`rejected`) completion, as
TRL's preference datasets write them: plain strings, chat messages (`prompt` a list of messages,
`chosen`/`rejected` the assistant messages that follow), or two whole conversations whose last
assistant turn differs. A pair's two sequences run in one forward; a sequence's log-probability
is the sum over its completion tokens (the mean for IPO).

    sigmoid (Rafailov et al. 2023):  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    ipo     (Azar et al. 2023):      ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2

The reference log-probabilities come from the model the run starts from: computed once before the
first step (`reference: precomputed`, cached in the run's cache directory) or by a frozen copy in
every step (`reference: live`; a LoRA run's reference is its base with the adapters switched off).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ember.train.config import ConfigError, DPOSpec

# ---- data -------------------------------------------------------------------------------------

def _pair_sides(record: Any, where: str) -> tuple[Any, Any]:
    """A preference record -> (chosen, rejected), each described for `side_tokens` as
    ("text", prompt, completion) or ("chat", messages, index of the first scored message)."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ConfigError(f"{where}: a preference record needs 'chosen' and 'rejected'")
    prompt = record.get("prompt", None)
    sides = []
    for key in ("chosen", "rejected"):
        value = record[key]
        if isinstance(prompt, str) and isinstance(value, str):
            sides.append(("text", prompt, value))
        elif isinstance(value, list) and (prompt is None or isinstance(prompt, list)):
            messages = (prompt or []) + value
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages):
                raise ConfigError(f"{where}: {key}: every message needs a string 'role' and 'content'")
            if prompt is None:  # two whole conversations: the last assistant turn is what differs
                last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            else:
                last = len(prompt) if any(m["role"] == "assistant" for m in value) else None
            if last is None:
                raise ConfigError(f"{where}: {key} has no assistant message to score")
            sides.append(("chat", messages, last))
        else:
            raise ConfigError(f"{where}: 'prompt', 'chosen' and 'rejected' must be strings, or lists of messages "
                              f"(got {type(prompt).__name__}, {type(record['chosen']).__name__}, "
                              f"{type(record['rejected']).__name__})")
    return sides[0], sides[1]


def side_tokens(tokenizer, side: tuple, eos: int) -> tuple[list[int], list[int]]:
    """(token ids, 1 on the scored completion's tokens and the EOS that ends it)."""
    from ember.train.data import chat_tokens, completion_tokens

    if side[0] == "text":
        ids, mask = completion_tokens(tokenizer, side[1], side[2])
    else:
        ids, mask = chat_tokens(tokenizer, side[1], "assistant", from_message=side[2])
    return ids + [eos], mask + [1]


def read_pairs(files: list) -> list[tuple[tuple, tuple]]:
    """The pairs of JSONL files and of datasets' rows (ember.train.hf_datasets: parquet, arrow, hf: ids)."""
    from ember.train.data import read_jsonl
    from ember.train.hf_datasets import DatasetSource

    pairs = []
    for path in files:
        if isinstance(path, DatasetSource):
            records = path.records()
        elif path.suffix != ".jsonl":
            raise ConfigError(f"data: {path}: DPO reads preference records (prompt, chosen, rejected) from JSONL, "
                              "parquet or arrow files or Hugging Face datasets")
        else:
            records = read_jsonl(path)
        pairs += [_pair_sides(record, where) for where, record in records]
    return pairs


def _truncate(ids: list[int], mask: list[int], limit: int) -> tuple[list[int], list[int]]:
    """At most `limit` tokens: the prompt loses its start first, then the completion its end."""
    if len(ids) <= limit:
        return ids, mask
    first = mask.index(1) if 1 in mask else len(ids)
    start = max(0, min(first, len(ids) - limit))
    return ids[start:start + limit], mask[start:start + limit]


class PairDataset:
    """Tokenized preference pairs; `batch` pads a micro-batch's chosen then rejected sequences."""

    def __init__(self, sequences: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int):
        self.sequences = sequences  # 2 per pair: chosen, rejected
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.reference: torch.Tensor | None = None  # [pairs, 2] log-probabilities (precomputed reference)

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [2B, T], labels [2B, T] with -100 off the completions, pair indices [B]); rows 0..B-1
        are the chosen sequences, B..2B-1 the rejected ones."""
        indices = [int(i) for i in indices]
        rows = [self.sequences[2 * i + side] for side in (0, 1) for i in indices]
        width = max(len(ids) for ids, _ in rows) - 1
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            ids = torch.from_numpy(ids.astype(np.int64))
            n = len(ids) - 1
            inputs[r, :n] = ids[:-1]
            labels[r, :n] = torch.where(torch.from_numpy(mask[1:].astype(bool)), ids[1:], -100)
        return inputs, labels, torch.tensor(indices)


def build_pair_datasets(spec, tokenizer, cache_dir: Path | None) -> tuple[PairDataset, PairDataset | None]:
    """Train (and held-out) pairs: data.eval, or the last eval_fraction of data.train's pairs."""
    from ember.train.data import expand_files, source_key

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def tokenized(files: list) -> list[tuple[np.ndarray, np.ndarray]]:
        key = hashlib.sha256(tokenizer.hf.to_str().encode() + str(spec.seq_len).encode())
        for f in files:
            key.update(source_key(f).encode())
        cache = cache_dir / f"pairs-{key.hexdigest()[:16]}.pt" if cache_dir else None
        if cache is not None and cache.is_file():
            return torch.load(cache, weights_only=False)
        out = []
        for chosen, rejected in read_pairs(files):
            for side in (chosen, rejected):
                ids, mask = _truncate(*side_tokens(tokenizer, side, eos), spec.seq_len + 1)
                out.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(out, cache.with_suffix(".tmp"))
            cache.with_suffix(".tmp").replace(cache)
        return out

    train = tokenized(expand_files(spec.train, "data.train"))
    if spec.eval:
        held = tokenized(expand_files(spec.eval, "data.eval"))
    else:
        pairs = len(train) // 2
        cut = pairs - int(pairs * spec.eval_fraction)
        train, held = train[:2 * cut], train[2 * cut:]
    if not train:
        raise ConfigError("data.train: no preference pairs")
    evaluation = PairDataset(held, spec.seq_len, eos)
    return PairDataset(train, spec.seq_len, eos), evaluation if len(evaluation) else None


# ---- the loss -----------------------------------------------------------------------------------

def sequence_logps(token_logps: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per row: the sum (or mean) of the token log-probabilities (`model(inputs, labels=labels)`)
    over the positions with a label (not -100)."""
    total = token_logps.sum(-1)
    return total / (labels != -100).sum(-1).clamp(min=1) if average else total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, spec: DPOSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and the implicit rewards beta * (policy - reference) of each side."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if spec.loss_type == "ipo":
        losses = (margin - 1 / (2 * spec.beta)) ** 2
    else:
        eps = spec.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(spec.beta * margin) - eps * F.logsigmoid(-spec.beta * margin)
    rewards = {"chosen_reward": spec.beta * chosen_ratio.detach(), "rejected_reward": spec.beta * rejected_ratio.detach()}
    return losses, rewards


@torch.no_grad()
def precompute_reference(model, data: PairDataset, micro_batch: int, rank: int, world: int, device,
                         sequence_forward, keep: bool = True) -> torch.Tensor:
    """[pairs, 2] reference log-probabilities from `model` as it is now, every (data) rank a share; all
    ranks run the same number of forwards (a sharded model's all-gathers are collective).
    `sequence_forward(inputs, labels)` -> each row's log-probability (Trainer._sequence_logps); `keep`:
    whether this rank's results count (a context-parallel group's ranks compute the same rows: one keeps)."""
    import torch.distributed as dist

    n = len(data)
    out = torch.zeros(n, 2, dtype=torch.float64, device=device)
    mine = list(range(rank, n, world))
    steps = -(-((n + world - 1) // world) // micro_batch)
    was_training = model.training
    model.eval()
    for s in range(steps):
        chunk = mine[s * micro_batch:(s + 1) * micro_batch]
        real = len(chunk)
        chunk = chunk + [0] * (micro_batch - real) if chunk else [0] * micro_batch
        inputs, labels, _ = data.batch(chunk)
        labels = labels.to(device)
        logps = sequence_forward(inputs, labels).double()
        b = len(chunk)
        for j in range(real):
            out[chunk[j], 0], out[chunk[j], 1] = logps[j], logps[b + j]
    model.train(was_training)
    if not keep:
        out.zero_()
    dist.all_reduce(out)
    return out.float().cpu()


def reference_cache_key(config, data: PairDataset) -> str:
    """What the precomputed reference depends on: the starting model, the precision and the pairs."""
    key = hashlib.sha256(json.dumps({"model": config.model.__dict__, "precision": config.precision,
                                     "seed": config.seed, "lora": bool(config.lora),
                                     "ipo": config.dpo.loss_type == "ipo"}, sort_keys=True, default=str).encode())
    for ids, mask in data.sequences:
        key.update(ids.tobytes())
        key.update(mask.tobytes())
    return key.hexdigest()[:16]


@contextlib.contextmanager
def adapters_off(model):
    """The base model's outputs from a LoRA model (its reference, in a LoRA DPO run)."""
    from ember.models.lora import TrainableLoRA

    adapters = [m for m in model.modules() if isinstance(m, TrainableLoRA)]
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a in adapters:
            a.enabled = True
