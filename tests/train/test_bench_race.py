"""`ember bench train --compare deepspeed`: the translation of ember's config for the DeepSpeed peer and
the token windows both sides train on (DeepSpeed itself is never needed here)."""

from __future__ import annotations

import ast

import numpy as np
import pytest

from ember.bench import train_race


def test_deepspeed_spec_matches_embers_config(tmp_path):
    config = train_race.ember_config("m", tmp_path, 3, 5, 4, 64, 2e-4)
    spec = train_race.deepspeed_spec(config, 2, tmp_path / "w.npz")
    assert spec["ds_config"] == {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8,
        "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False, "gradient_clipping": 1.0,
    }
    # ember's OptimSpec defaults, the lr given
    assert spec["optimizer"] == {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01}
    with pytest.raises(ValueError, match="constant"):
        train_race.deepspeed_spec({**config, "scheduler": {"type": "cosine"}}, 2, tmp_path / "w.npz")


def test_windows_are_embers_batches(train_assets, tmp_path):
    from ember.bench.models import write_tokenizer

    write_tokenizer(tmp_path / "model", vocab_size=384)
    (tmp_path / "train.txt").write_text((train_assets / "train.txt").read_text())
    config = train_race.ember_config(str(tmp_path / "model"), tmp_path, 2, 3, 2, 32, 1e-4)
    data = np.load(train_race.write_windows(config, 2, tmp_path / "w.npz"))
    inputs, labels = data["inputs"], data["labels"]
    assert inputs.shape == labels.shape == (3, 2, 2, 32)
    assert (inputs[:, :, :, 1:] == labels[:, :, :, :-1]).all()  # next-token labels of one window
    rows = {row.tobytes() for row in inputs.reshape(-1, 32)}
    assert len(rows) == 12  # every (step, rank, row) a different window of the corpus


def test_peer_script_imports_no_ember():
    tree = ast.parse(train_race.PEER_SCRIPT.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n and n.split(".")[0] == "ember"]  # the peer's venv has no ember
