"""`compile: true`: each transformer block under torch.compile gives eager's losses (fp32, 1e-5); the key,
DeepSpeed's `compile` section and the combinations that are refused."""

import json
import logging

import pytest
import yaml

from ember.train.config import ConfigError, TrainConfig
from tests.train.conftest import write_config


def fit(path) -> list[dict]:
    from ember.train.trainer import run

    run(TrainConfig.load(path))
    run_dir = yaml.safe_load(path.read_text())["run_dir"]
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]


@pytest.mark.slow  # (inductor compiles C++ on a cold cache: ~40 s)
def test_compiled_blocks_give_eager_losses(train_assets, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # activation checkpointing too: a checkpointed block recomputes its compiled forward in backward
    common = {"max_steps": 2, "activation_checkpointing": True, "data": {"eval_fraction": 0.0}}
    eager = fit(write_config(tmp_path / "eager", train_assets, **common))
    compiled = fit(write_config(tmp_path / "compiled", train_assets, compile=True, **common))
    assert [r["step"] for r in compiled] == [1, 2]
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    assert "compile: 2 transformer blocks run under torch.compile" in caplog.text
    assert "compile: the first step took" in caplog.text


@pytest.mark.slow
def test_compiled_training_and_evaluation_on_two_processes(train_assets, tmp_path):
    """ZeRO-3 (FSDP2 wraps the compiled blocks) on 2 processes, with held-out evaluation (the no-grad
    graph, and a smaller last batch: the batch size turns dynamic) against eager on 1 process."""
    from tests.train.conftest import train

    common = {"max_steps": 6, "eval_interval": 3}
    eager = train(write_config(tmp_path / "eager", train_assets, **common))
    compiled = train(write_config(tmp_path / "compiled", train_assets, compile=True, zero_stage=3, **common), nproc=2)
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
        if "eval_loss" in a:
            assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5


def test_compile_key_and_deepspeed_section(train_assets, tmp_path, caplog):
    raw = yaml.safe_load(write_config(tmp_path, train_assets).read_text())
    assert TrainConfig.from_dict(raw).compile is False
    assert TrainConfig.from_dict({**raw, "compile": True}).compile is True
    with pytest.raises(ConfigError, match=r"compile: 'yes' is invalid \(true or false\)"):
        TrainConfig.from_dict({**raw, "compile": "yes"})
    # DeepSpeed's section tunes engine.compile(), which a script calls: accepted with no effect, and said so
    caplog.set_level(logging.INFO)
    config = TrainConfig.from_dict({**raw, "compile": {"deepcompile": False, "free_activation": True}})
    assert config.compile is False
    assert "compile.deepcompile, compile.free_activation" in caplog.text and "`compile: true`" in caplog.text
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_dict({**raw, "compile": {"deepcompile": True, "offload_everything": True}})
    assert "compile.deepcompile: true: DeepCompile" in str(error.value)
    assert "compile.offload_everything: unknown key" in str(error.value)


def test_compile_refuses_what_would_not_compile(train_assets, tmp_path):
    from ember.train.trainer import preflight

    moe = TrainConfig.load(write_config(tmp_path / "moe", train_assets, compile=True, model={
        "architecture": "MixtralForCausalLM", "num_local_experts": 4, "num_experts_per_tok": 2}))
    with pytest.raises(ConfigError, match=r"compile: true is not supported with MixtralForCausalLM"):
        preflight(moe, 1)
    ulysses = TrainConfig.load(write_config(tmp_path / "cp", train_assets, compile=True, context_parallel=2))
    with pytest.raises(ConfigError, match=r"compile: true is not supported with context_parallel: 2"):
        preflight(ulysses, 2)
    preflight(TrainConfig.load(write_config(tmp_path / "ok", train_assets, compile=True, zero_stage=3)), 2)
