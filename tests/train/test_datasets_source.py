"""Hugging Face datasets as training data: parquet/arrow files, save_to_disk directories and `hf:` Hub ids
(from a cache written here: nothing is downloaded) give exactly the token streams of the same records as JSONL."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ember.tokenizer import Tokenizer
from ember.train.config import ConfigError, DataSpec, TrainConfig
from ember.train.data import build_datasets, expand_files
from ember.train.dpo import build_pair_datasets
from tests.train.conftest import write_config

needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="Hugging Face datasets is not installed (pip install 'ember[datasets]')")

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six."}]
PROMPT = [{"role": "user", "content": "Two plus two?"}]


def _chat(i: int) -> list[dict]:
    chat = [dict(m, content=f"{m['content']} {i}") for m in CHAT]
    if i % 3 == 0:  # a key only some messages have: arrow gives the others None, read as absent
        chat[1]["name"] = "bob"
    return chat


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def table(rows: list[dict]):
    """A Dataset of rows with different keys (a JSONL file's records may differ): every key in every row."""
    import datasets

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])


def write_parquet(path: Path, rows: list[dict]) -> Path:
    table(rows).to_parquet(str(path))
    return path


def fake_hub_cache(cache: Path, repo_id: str, splits: dict[str, list[dict]], revision: str = "0" * 40) -> Path:
    """The directory `load_dataset(repo_id)` leaves in HF_DATASETS_CACHE, which it reads back offline:
    ORG___NAME/default/0.0.0/REVISION/{dataset_info.json, NAME-SPLIT.arrow}."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    namespace, name = repo_id.split("/")
    directory = cache / f"{namespace}___{name}" / "default" / "0.0.0" / revision
    directory.mkdir(parents=True)
    info = datasets.DatasetInfo(dataset_name=name, config_name="default", splits=datasets.SplitDict(dataset_name=name))
    for split, rows in splits.items():
        dataset = table(rows)
        with ArrowWriter(features=dataset.features, path=str(directory / f"{name}-{split}.arrow")) as writer:
            writer.write_table(dataset.data.table)
            writer.finalize()
        info.features = dataset.features
        info.splits.add(datasets.SplitInfo(name=split, num_examples=len(rows), dataset_name=name))
    info.write_to_directory(str(directory))
    return directory


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """datasets reading HF_DATASETS_CACHE=tmp_path/hf-cache with HF_HUB_OFFLINE set (it read both at import)."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def stream(patterns, tokenizer, cache_dir=None, **spec) -> np.ndarray:
    data, _ = build_datasets(DataSpec(train=tuple(map(str, patterns)), seq_len=16, eval_fraction=0.0, **spec),
                             tokenizer, cache_dir)
    return np.asarray(data.ids)


@needs_datasets
def test_text_records_match_jsonl(train_assets, tmp_path, offline_cache):  # (offline: local files need no Hub)
    tokenizer = Tokenizer(train_assets / "tok")
    lines = [line for line in (train_assets / "train.txt").read_text().splitlines() if line.strip()][:60]
    rows = [{"text": line, "id": i} for i, line in enumerate(lines)]
    reference = stream([write_jsonl(tmp_path / "a.jsonl", rows[:30]), write_jsonl(tmp_path / "b.jsonl", rows[30:])],
                       tokenizer)
    (tmp_path / "pq").mkdir()
    write_parquet(tmp_path / "pq" / "a.parquet", rows[:30])
    write_parquet(tmp_path / "pq" / "b.parquet", rows[30:])
    assert np.array_equal(stream([tmp_path / "pq" / "*.parquet"], tokenizer), reference)

    import datasets

    datasets.Dataset.from_list(rows[:30]).save_to_disk(str(tmp_path / "saved"))  # a directory, and its .arrow file
    saved_arrow = next((tmp_path / "saved").glob("*.arrow"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows[30:])).save_to_disk(str(tmp_path / "dict"))
    assert np.array_equal(stream([tmp_path / "saved", tmp_path / "dict"], tokenizer), reference)
    assert np.array_equal(stream([saved_arrow, tmp_path / "pq" / "b.parquet"], tokenizer), reference)
    # a field other than `text`
    renamed = [{"body": r["text"]} for r in rows]
    assert np.array_equal(stream([write_parquet(tmp_path / "body.parquet", renamed)], tokenizer, text_field="body"),
                          reference)


@needs_datasets
def test_chat_and_completion_records_match_jsonl(train_assets, tmp_path, offline_cache):
    tokenizer = Tokenizer(train_assets / "tok")
    rows = [{"messages": _chat(i)} if i % 2 else {"prompt": f"Q{i}: two plus two? A:", "completion": " four"}
            for i in range(24)]
    for loss_on in ("assistant", "last_turn"):
        reference = stream([write_jsonl(tmp_path / "chat.jsonl", rows)], tokenizer, loss_on=loss_on)
        parquet = stream([write_parquet(tmp_path / "chat.parquet", rows)], tokenizer, loss_on=loss_on)
        assert np.array_equal(parquet, reference)
    fake_hub_cache(offline_cache, "org/chats", {"train": rows, "test": rows[:4]})
    assert np.array_equal(stream(["hf:org/chats"], tokenizer, loss_on="last_turn"), reference)
    assert np.array_equal(stream(["hf:org/chats@train"], tokenizer, loss_on="last_turn"), reference)
    # data.eval's default split is `test` (TRL's); datasets' slicing applies
    spec = DataSpec(train=("hf:org/chats@train[:4]",), eval=("hf:org/chats",), seq_len=16)
    train, held = build_datasets(spec, tokenizer, None)
    assert np.array_equal(np.asarray(train.ids), np.asarray(held.ids))
    data, _ = build_datasets(DataSpec(train=(str(tmp_path / "chat.parquet"),), seq_len=16, eval_fraction=0.0),
                             tokenizer, None)
    inputs, labels = data.batch(np.arange(len(data)))
    assert 0 < int((labels != -100).sum()) < labels.numel() / 2  # prompts are not labels


@needs_datasets
def test_dpo_pairs_match_jsonl(train_assets, tmp_path, offline_cache):
    tokenizer = Tokenizer(train_assets / "tok")
    text = [{"prompt": f"Q{i}: two plus two? A:", "chosen": " four", "rejected": " five"} for i in range(5)]
    chat = [{"prompt": PROMPT, "chosen": [{"role": "assistant", "content": f"Four {i}."}],
             "rejected": [{"role": "assistant", "content": "Five."}]} for i in range(5)]
    whole = [{"chosen": PROMPT + r["chosen"], "rejected": PROMPT + r["rejected"]} for r in chat]

    def sequences(patterns):
        data, _ = build_pair_datasets(DataSpec(train=tuple(map(str, patterns)), seq_len=64, eval_fraction=0.0),
                                      tokenizer, None)
        return data.sequences

    reference = sequences([write_jsonl(tmp_path / f"{n}.jsonl", rows)
                           for n, rows in (("a", text), ("b", chat), ("c", whole))])
    for n, rows in (("a", text), ("b", chat), ("c", whole)):
        write_parquet(tmp_path / f"pairs-{n}.parquet", rows)
    fake_hub_cache(offline_cache, "org/prefs", {"train": whole})
    for patterns in ([tmp_path / "pairs-*.parquet"], [tmp_path / "pairs-a.parquet", tmp_path / "pairs-b.parquet",
                                                       "hf:org/prefs"]):
        got = sequences(patterns)
        assert len(got) == len(reference) == 30
        assert all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(got, reference))


@needs_datasets
def test_the_token_cache_follows_the_content(train_assets, tmp_path, offline_cache):
    tokenizer = Tokenizer(train_assets / "tok")
    cache = tmp_path / "tokens"
    path = write_parquet(tmp_path / "a.parquet", [{"text": "one two three four five six seven"}] * 8)
    first = stream([path], tokenizer, cache)
    assert np.array_equal(stream([path], tokenizer, cache), first) and len(list(cache.iterdir())) == 1
    write_parquet(path, [{"text": "eight nine ten eleven twelve thirteen"}] * 8)
    os.utime(path, ns=(1, 1))  # the same size and a new mtime is new content too
    assert not np.array_equal(stream([path], tokenizer, cache), first) and len(list(cache.iterdir())) == 2
    # a Hub dataset: a new revision in the cache is a new fingerprint
    fake_hub_cache(offline_cache, "org/text", {"train": [{"text": "one two three four five six seven"}] * 8})
    hub = stream(["hf:org/text"], tokenizer, cache)
    assert np.array_equal(stream(["hf:org/text"], tokenizer, cache), hub) and len(list(cache.iterdir())) == 3
    newer = fake_hub_cache(offline_cache, "org/text", {"train": [{"text": "eight nine ten eleven"}] * 8}, "1" * 40)
    os.utime(newer, (2e9, 2e9))  # the newest revision is the one read
    assert not np.array_equal(stream(["hf:org/text"], tokenizer, cache), hub) and len(list(cache.iterdir())) == 4


@needs_datasets
def test_clear_errors(train_assets, tmp_path, offline_cache):
    tokenizer = Tokenizer(train_assets / "tok")
    with pytest.raises(ConfigError) as e:
        expand_files(("hf:org/missing",), "data.eval")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("data.eval: 'hf:org/missing' is not in the Hugging Face datasets cache (")
    assert "HF_HUB_OFFLINE is set" in str(e.value)
    with pytest.raises(ConfigError, match=r"'hf:a/b/c' is not a Hub dataset id"):
        expand_files(("hf:a/b/c",), "data.train")
    fake_hub_cache(offline_cache, "org/only-train", {"train": [{"text": "x"}]})
    with pytest.raises(ConfigError, match=r"data.eval: 'hf:org/only-train': Unknown split \"test\""):
        expand_files(("hf:org/only-train",), "data.eval")
    path = write_parquet(tmp_path / "bad.parquet", [{"text": "fine"}, {"body": "no text"}])
    with pytest.raises(ConfigError, match=r"bad.parquet row 1: no string field 'text'"):
        stream([path], tokenizer)
    with pytest.raises(ConfigError, match=r"bad.parquet row 0: a preference record needs"):
        build_pair_datasets(DataSpec(train=(str(path),)), tokenizer, None)


def test_without_datasets_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    for pattern in (str(tmp_path / "*.parquet"), "hf:org/name"):
        with pytest.raises(ConfigError, match=r"^data.train: '.*' is read with Hugging Face datasets, which is not "
                                              r"installed \(pip install 'ember\[datasets\]'\)$"):
            expand_files((pattern,), "data.train")
    with pytest.raises(ConfigError, match="matches no file"):  # text and JSONL need no datasets
        expand_files((str(tmp_path / "*.jsonl"),), "data.train")


def test_config_keeps_hub_ids(train_assets, tmp_path):
    path = write_config(tmp_path, train_assets, data={"train": ["hf:org/name@train", "shards/*.parquet"],
                                                      "eval": ["hf:org/name:en@test"]})
    config = TrainConfig.load(path)
    assert config.data.train == ("hf:org/name@train", str(tmp_path / "shards/*.parquet"))
    assert config.data.eval == ("hf:org/name:en@test",)


@needs_datasets
def test_cli_reads_the_cache_the_environment_names(train_assets, tmp_path):
    """HF_HOME places the cache and HF_HUB_OFFLINE keeps it offline; a dataset it lacks is one line, before training."""
    fake_hub_cache(tmp_path / "home" / "datasets", "org/name", {"train": [{"text": "one two three"}] * 200})
    config = write_config(tmp_path, train_assets, data={"train": ["hf:org/name"], "eval": ["hf:org/missing"]})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "ember.cli", "train", str(config)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"error: data.eval: 'hf:org/missing' is not in the Hugging Face datasets cache ({tmp_path / 'home'}" \
        in out.stderr, out.stderr[-3000:]  # data.train loaded from that cache: the error is data.eval's
    assert not (Path(yaml.safe_load(config.read_text())["run_dir"]) / "metrics.jsonl").exists()
