"""Training data read through Hugging Face `datasets` (optional: pip install 'ember[datasets]').

Next to text and JSONL files, `data.train` / `data.eval` (and `ember train eval`) take:

- parquet and arrow files, globs allowed (`data/*.parquet`, `shards/*.arrow`), streamed file by file;
- a directory written by `Dataset.save_to_disk` (a saved DatasetDict: its split, as for `hf:` ids);
- `hf:NAME`, `hf:ORG/NAME`, with an optional `:CONFIG` and `@SPLIT` (`hf:org/name:en@train[:10%]`): a
  Hub dataset loaded as `datasets.load_dataset` loads it, from its cache (HF_HOME, HF_DATASETS_CACHE),
  downloaded there first unless HF_HUB_OFFLINE is set. The split defaults to `train`, and to `test` in
  data.eval (TRL's defaults); datasets' slicing (`train[:1000]`) applies.

Each row is the record a JSONL line would be, so text, `messages`, prompt/completion and preference
records read unchanged. The tokenized-stream cache is keyed as a JSONL file's is (path, size, mtime)
for parquet/arrow files, and by the dataset's fingerprint and its cache files' size and mtime for
Hub and saved datasets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ember.train.config import ConfigError

HUB_PREFIX = "hf:"
TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # file suffix -> datasets' packaged builder
INSTALL = "pip install 'ember[datasets]'"


class DatasetSource:
    """Records from a parquet/arrow file (streamed when read) or a loaded Dataset (Hub or save_to_disk)."""

    def __init__(self, name: str, path: Path | None = None, dataset: Any = None):
        self.name = name  # as messages name it: the file or directory, or the hf: id as written
        self.path = path
        self.dataset = dataset

    def __repr__(self) -> str:
        return f"DatasetSource({self.name!r})"

    def key(self) -> str:
        """What the tokenized stream of this source depends on."""
        if self.dataset is None:  # a file, as a JSONL file is keyed
            stat = self.path.stat()
            return f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        parts = [self.name, str(getattr(self.dataset, "_fingerprint", ""))]
        for entry in self.dataset.cache_files:
            stat = os.stat(entry["filename"])
            parts.append(f"{entry['filename']}:{stat.st_size}:{stat.st_mtime_ns}")
        return ":".join(parts)

    def records(self) -> Iterator[tuple[str, Any]]:
        """("NAME row I", record) for each row, I from 0 as datasets indexes them."""
        rows = self.dataset
        if rows is None:
            datasets = require_datasets("data", self.name)
            builder = TABLE_BUILDERS[self.path.suffix]
            with _quiet():
                rows = datasets.load_dataset(builder, data_files=[str(self.path.resolve())], split="train",
                                             streaming=True)
        for i, row in enumerate(rows):
            yield f"{self.name} row {i}", _plain(row)


def _plain(value: Any) -> Any:
    """A row as its JSONL line reads: arrow gives each dict in a column (a chat's messages) every key any
    of them has, None where one lacks it; a None is taken as an absent key."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def require_datasets(section: str, what: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{section}: {what!r} is read with Hugging Face datasets, which is not installed "
                          f"({INSTALL})") from None
    return datasets


@contextlib.contextmanager
def _quiet():
    """datasets' expected warnings off (offline mode: "using the latest cached version ...")."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


def default_split(section: str) -> str:
    return "test" if section == "data.eval" else "train"


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def table_file(path: Path, section: str) -> DatasetSource:
    require_datasets(section, str(path))
    return DatasetSource(str(path), path=path)


def saved_dataset(path: Path, section: str) -> DatasetSource:
    """A `save_to_disk` directory; of a DatasetDict, the section's default split."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        split = default_split(section)
        if split not in splits:
            raise ConfigError(f"{section}: {str(path)!r} is a saved DatasetDict without a {split!r} split: name "
                              f"one split's directory ({', '.join(str(path / s) for s in splits)})")
        path = path / split
    datasets = require_datasets(section, str(path))
    try:
        with _quiet():
            dataset = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ConfigError(f"{section}: {str(path)!r} cannot be read as a saved dataset ({_one_line(e)})") from None
    return DatasetSource(str(path), path=path, dataset=dataset)


def hub_dataset(pattern: str, section: str) -> DatasetSource:
    """`hf:[ORG/]NAME[:CONFIG][@SPLIT]`, loaded now (so a dataset neither cached nor reachable is
    reported before any process starts)."""
    repo, _, split = pattern[len(HUB_PREFIX):].partition("@")
    repo, _, config = repo.partition(":")
    if not repo or repo.count("/") > 1 or "" in repo.split("/"):
        raise ConfigError(f"{section}: {pattern!r} is not a Hub dataset id: hf:NAME or hf:ORG/NAME, optionally "
                          "with :CONFIG and @SPLIT (hf:org/name:config@train)")
    datasets = require_datasets(section, pattern)
    try:
        with _quiet():
            dataset = datasets.load_dataset(repo, config or None, split=split or default_split(section))
    except Exception as e:
        raise ConfigError(_hub_problem(datasets, pattern, section, e)) from None
    return DatasetSource(pattern, dataset=dataset)


def _hub_problem(datasets, pattern: str, section: str, e: Exception) -> str:
    from datasets.exceptions import DatasetNotFoundError

    if isinstance(e, (ConnectionError, FileNotFoundError)) and not isinstance(e, DatasetNotFoundError):
        where = f"{section}: {pattern!r} is not in the Hugging Face datasets cache ({datasets.config.HF_DATASETS_CACHE})"
        if datasets.config.HF_HUB_OFFLINE:
            return (f"{where} and HF_HUB_OFFLINE is set: load it once with the Hub reachable, or point HF_HOME or "
                    "HF_DATASETS_CACHE at a cache that holds it")
        return f"{where} and the Hub cannot be reached ({_one_line(e)})"
    return f"{section}: {pattern!r}: {_one_line(e)}"
