"""Checkpoints are committed atomically and `resume: auto` continues from the latest complete one."""

from __future__ import annotations

import json
import shutil

import yaml

from tests.train.conftest import train, write_config


def test_resume_auto_takes_the_latest_complete_checkpoint(train_assets, tmp_path):
    config = write_config(tmp_path, train_assets, max_steps=14, save_interval=5)
    first = {r["step"]: r["loss"] for r in train(config)}
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "final" and not list(root.glob(".pending-*"))
    # as if the run had died after step 10's checkpoint, in the middle of saving step 15's
    shutil.rmtree(root / "final")
    (root / "latest").write_text("step-10")
    (root / ".pending-step-15" / "dcp").mkdir(parents=True)
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "resume": "auto"}))
    records = train(config)  # the metrics file: steps 1-10 kept from the first run, 11-14 from this one
    assert [r["step"] for r in records] == list(range(1, 15))
    resumed = {r["step"]: r["loss"] for r in records if r["step"] > 10}
    for step, loss in resumed.items():
        assert abs(loss - first[step]) <= 1e-5 * abs(loss), (step, loss, first[step])
    assert (root / "latest").read_text() == "final"


def test_resume_auto_without_checkpoints_starts_fresh(train_assets, tmp_path):
    config = write_config(tmp_path, train_assets, max_steps=2, resume="auto")
    assert [r["step"] for r in train(config)] == [1, 2]
    assert json.loads((tmp_path / "run" / "checkpoints" / "final" / "trainer_state.json").read_text())["step"] == 2
