"""Training config validation, the Python API, export round trip, plots and crash handling."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from ember.train.config import ConfigError, TrainConfig
from tests.train.conftest import is_worker_alive, logged_steps, train_job, write_config
from tests.waiting import wait_until


def load_raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_config_errors_are_clear(train_assets, tmp_path):
    path = write_config(tmp_path, train_assets)
    raw = load_raw(path)

    def expect(change, pattern, world=1):
        bad = json.loads(json.dumps(raw))
        change(bad)
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        from ember.train.trainer import preflight

        with pytest.raises(ConfigError, match=pattern):
            preflight(TrainConfig.load(tmp_path / "bad.yaml"), world)

    expect(lambda c: c.update(micro_batchsize=4), r"micro_batchsize: unknown key; did you mean 'micro_batch_size'")
    expect(lambda c: c["optimizer"].update(learning_rate=1), r"optimizer.learning_rate: unknown key")
    expect(lambda c: c["data"].update(train=["/nonexistent/file.txt"]), r"data.train: '/nonexistent/file.txt' matches no file")
    expect(lambda c: c.update(global_batch_size=9), r"global_batch_size: 9 is not a multiple", world=2)
    expect(lambda c: c["model"].update(vocab_size=100), r"model.vocab_size: the tokenizer has \d+ tokens")
    expect(lambda c: c.update(zero_stage=5), r"zero_stage: 5 is invalid")
    expect(lambda c: c.update(offload_params=True), r"offload_params")


def test_deepspeed_style_config(train_assets, tmp_path):
    raw = load_raw(write_config(tmp_path, train_assets))
    for key in ("zero_stage", "micro_batch_size", "global_batch_size", "optimizer"):
        raw.pop(key)
    raw.update({
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "betas": [0.9, 0.99], "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 5, "total_num_steps": 50}},
        "steps_per_print": 10,
    })
    raw.pop("max_steps")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    config = TrainConfig.load(path)
    assert (config.zero_stage, config.micro_batch_size, config.grad_accum, config.grad_clip) == (2, 2, 4, 0.5)
    assert config.offload_optimizer and config.precision == "bf16" and config.max_steps == 50
    assert config.optimizer.lr == 0.001 and config.optimizer.betas == (0.9, 0.99) and config.optimizer.weight_decay == 0.1
    assert config.scheduler.type == "WarmupCosineLR" and config.scheduler.params["warmup_num_steps"] == 5


def test_python_api_export_round_trip_and_plot(train_assets, tmp_path):
    import transformers

    from ember import LLM, SamplingParams
    from ember.train.checkpoint import export_checkpoint
    from ember.train.plot import plot_run
    from ember.train.trainer import Trainer

    path = write_config(tmp_path, train_assets, max_steps=6, eval_interval=3)
    trainer = Trainer(TrainConfig.load(path))
    last = trainer.fit()
    assert last["eval_loss"] is not None
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 7, 12]])
    with torch.no_grad():
        trained = trainer.model.eval()(ids)[0].log_softmax(-1)
    out = export_checkpoint(last["checkpoint"], tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits[0].log_softmax(-1), trained, atol=1e-4, rtol=1e-4)
    llm = LLM(str(out), dtype="float32")
    result = llm.generate([ids[0].tolist()], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    for pos in range(1, ids.shape[1]):
        token = ids[0, pos].item()
        assert abs(result.prompt_logprobs[pos][token].logprob - trained[pos - 1, token].item()) < 1e-4
    pngs = plot_run(Path(last["checkpoint"]).parents[1])
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_a_crashed_rank_ends_the_job(train_assets, tmp_path):
    path = write_config(tmp_path, train_assets, max_steps=100000)
    with train_job(path, "--nproc", "2") as job:
        workers = job.running(lambda: logged_steps(tmp_path / "run") >= 3, "3 training steps")
        os.kill(workers[-1], signal.SIGKILL)  # one rank dies
        start = time.monotonic()
        code = job.proc.wait(timeout=60)
        assert code != 0 and time.monotonic() - start < 30
        assert not [pid for pid in workers if is_worker_alive(pid)]
        wait_until(lambda: "was killed by SIGKILL" in job.text, timeout=10, what="the error line")


def test_moe_training_reports_the_aux_loss(train_assets, tmp_path):
    from ember.train.trainer import Trainer

    path = write_config(tmp_path, train_assets, max_steps=3, model={
        "architecture": "MixtralForCausalLM", "num_local_experts": 4, "num_experts_per_tok": 2})
    raw = load_raw(path)
    raw["model"].update(num_local_experts=4, num_experts_per_tok=2)
    path.write_text(yaml.safe_dump(raw))
    last = Trainer(TrainConfig.load(path)).fit()
    assert last["aux_loss"] > 0 and last["loss"] > 0
