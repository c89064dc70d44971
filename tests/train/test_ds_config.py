"""DeepSpeed configs taken as written: HF's templates, "auto", all unknown keys at once, DeepSpeed's optimizer
and scheduler types (factors against DeepSpeed's formulas), the micro-batch derived from train_batch_size,
and fp16 with dynamic loss scaling."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from ember.train.config import ConfigError, LossScaleSpec, OptimSpec, TrainConfig
from ember.train.optim import Lion, build_scheduler, optimizer_args
from ember.train.precision import LossScaler
from ember.train.schedules import lr_factor, one_cycle_momentum, resolve
from ember.train.zero import param_groups
from tests.train.conftest import train

# Published configs, verbatim: Hugging Face transformers' tests/deepspeed/ds_config_zero2.json, the
# ds_config_zero3.json of its DeepSpeed guide (docs/source/en/deepspeed.md), and the config of DeepSpeed's
# getting-started tutorial (docs/_tutorials/getting-started.md).
ASSETS = Path(__file__).parent.parent / "assets" / "deepspeed"
HF_ZERO2 = (ASSETS / "hf_ds_config_zero2.json").read_text()
HF_ZERO3 = (ASSETS / "hf_ds_config_zero3.json").read_text()
TUTORIAL = (ASSETS / "deepspeed_getting_started.json").read_text()


def ember_sections(assets, run_dir, **extra) -> dict:
    """What a DeepSpeed config lacks and ember needs: the model, the data and where to write."""
    return {"model": {"tokenizer": str(assets / "tok"), "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "max_position_embeddings": 128},
            "data": {"train": [str(assets / "train.txt")], "seq_len": 32}, "run_dir": str(run_dir), "device": "cpu",
            **extra}


def load(text: str, assets, tmp_path, **extra) -> TrainConfig:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({**json.loads(text), **ember_sections(assets, tmp_path / "run", **extra)}))
    return TrainConfig.load(path)


@pytest.mark.parametrize("text, stage, params_offloaded", [(HF_ZERO2, 2, False), (HF_ZERO3, 3, True)])
def test_hf_templates_load_with_auto_resolved(text, stage, params_offloaded, train_assets, tmp_path, caplog,
                                              monkeypatch):
    monkeypatch.setenv("EMBER_DEEPSPEED_REPORTED", "")  # (restored afterwards: the mark is per launch)
    with caplog.at_level(logging.INFO, logger="ember.train.ds_config"):
        config = load(text, train_assets, tmp_path)
        load(text, train_assets, tmp_path)  # a second load (a torchrun worker's) reports nothing again
    assert (config.zero_stage, config.offload_optimizer, config.offload_params) == (stage, True, params_offloaded)
    assert config.precision == "fp32"  # fp16/bf16 "auto": off unless ember's precision says otherwise
    assert (config.micro_batch_size, config.accumulation(1), config.grad_clip) == (8, 1, 1.0)
    assert config.global_batch(2) == 16
    defaults = OptimSpec()
    assert config.optimizer == OptimSpec(type="adamw", lr=defaults.lr, betas=defaults.betas, eps=defaults.eps,
                                         weight_decay=defaults.weight_decay)
    assert config.scheduler.type == "WarmupLR"
    assert config.scheduler.params == {"warmup_min_lr": 0.0, "warmup_max_lr": defaults.lr, "warmup_num_steps": 0,
                                       "warmup_type": "log"}
    notes = [r.getMessage() for r in caplog.records if r.name == "ember.train.ds_config"]
    assert len(notes) == 1 and "zero_optimization.overlap_comm" in notes[0] and "steps_per_print" in notes[0]
    assert "FSDP2 buckets" in notes[0]

    # ember's own keys fill "auto": the micro-batch, the accumulation, the clipping, the precision
    config = load(text, train_assets, tmp_path, micro_batch_size=2, grad_accum=4, grad_clip=0.5, precision="fp16")
    assert (config.micro_batch_size, config.accumulation(1), config.grad_clip, config.precision) == (2, 4, 0.5, "fp16")
    assert config.loss_scaling == LossScaleSpec(0, 16, 1000, 2, False, 1)


def test_hf_zero3_template_trains_through_ember_train(train_assets, tmp_path):
    """The zero3 template as published, on 1 process, ZeRO-3 (FSDP2) with fp16 and dynamic loss scaling."""
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({**json.loads(HF_ZERO3), **ember_sections(
        train_assets, tmp_path / "run", max_steps=6, micro_batch_size=4, precision="fp16", seed=0)}))
    records = train(path, nproc=1)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
    assert all(r["lr"] == OptimSpec.lr for r in records)  # WarmupLR with warmup "auto" (0): the lr from the start
    assert records[0]["loss_scale"] == 2.0 ** 16


def test_tutorial_config_derives_the_micro_batch_and_trains_in_fp16(train_assets, tmp_path):
    """No train_micro_batch_size_per_gpu: micro = train_batch_size / (accumulation x world); zero_optimization: true
    is stage 1; "Adam" is AdamW with DeepSpeed's defaults; no scheduler section: a constant lr."""
    from ember.train.trainer import Trainer

    config = load(TUTORIAL, train_assets, tmp_path, max_steps=8)
    assert (config.zero_stage, config.precision, config.micro_batch_size, config.global_batch_size) == (1, "fp16",
                                                                                                        None, 8)
    assert [config.micro_batch(n) for n in (1, 2, 4)] == [8, 4, 2] and config.accumulation(2) == 1
    with pytest.raises(ConfigError, match=r"global_batch_size: 8 does not divide into grad_accum x world size "
                                          r"\(1 x 3\)"):
        config.micro_batch(3)
    assert config.optimizer == OptimSpec(type="adamw", lr=0.00015, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert config.scheduler.type == "constant" and config.grad_clip == 1.0

    trainer = Trainer(TrainConfig.from_dict({**json.loads(TUTORIAL), **ember_sections(
        train_assets, tmp_path / "run", max_steps=8, optimizer={"type": "Adam", "params": {"lr": 0.003}})}))
    last = trainer.fit()
    assert trainer.config.micro_batch_size == 8 and trainer.accum == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"] - 0.3
    assert last["loss_scale"] == 2.0 ** 16 and last["skipped_steps"] == 0

    # An overflow (inf gradients) skips the step and the lr step; hysteresis 2: the second one halves the scale.
    params = dict(trainer.model.named_parameters())
    hook = next(iter(params.values())).register_hook(lambda g: torch.full_like(g, float("inf")))
    before = {n: p.detach().clone() for n, p in params.items()}
    lr_steps = trainer.scheduler.last_epoch
    _, norm = trainer.train_step(8)
    assert not math.isfinite(norm) and trainer.scaler.scale == 2.0 ** 16 and trainer.scaler.skipped == 1
    trainer.train_step(9)
    assert trainer.scaler.scale == 2.0 ** 15 and trainer.scaler.skipped == 2
    assert trainer.scheduler.last_epoch == lr_steps
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    hook.remove()
    trainer.train_step(10)
    assert trainer.scheduler.last_epoch == lr_steps + 1
    assert not all(torch.equal(p, before[n]) for n, p in params.items())


def test_unknown_keys_all_in_one_error(train_assets, tmp_path):
    raw = {**json.loads(HF_ZERO2), **ember_sections(train_assets, tmp_path)}
    raw["micro_batchsize"] = 4
    raw["model"] = {**raw["model"], "hiden_size": 64}
    raw["zero_optimization"] = {**raw["zero_optimization"], "overlap_com": True, "stage3_max_live_params": 1e9}
    raw["fp16"] = {**raw["fp16"], "loss_scale_windw": 10}
    raw["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4, "betaz": [0.9, 0.99]}}
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(raw)
    message = str(e.value)
    assert message.startswith("config: 6 problems:")
    for line in ("micro_batchsize: unknown key; did you mean 'micro_batch_size'?",
                 "model.hiden_size: unknown key; did you mean 'hidden_size'?",
                 "zero_optimization.overlap_com: unknown key; did you mean 'overlap_comm'?",
                 "zero_optimization.stage3_max_live_params: unknown key; did you mean 'stage3_max_live_parameters'?",
                 "fp16.loss_scale_windw: unknown key; did you mean 'loss_scale_window'?",
                 "optimizer.params.betaz: unknown key; did you mean 'betas'?"):
        assert line in message


def test_zero_section_forms_and_refusals(train_assets, tmp_path):
    base = ember_sections(train_assets, tmp_path)
    assert TrainConfig.from_dict({**base, "zero_optimization": True}).zero_stage == 1  # DeepSpeed's old form
    assert TrainConfig.from_dict({**base, "zero_optimization": False}).zero_stage == 0
    nvme = {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"}}
    with pytest.raises(ConfigError, match=r"zero_optimization.offload_param.device: 'nvme' \(ZeRO-Infinity\) is not "
                                          r"supported"):
        TrainConfig.from_dict({**base, "zero_optimization": nvme})
    with pytest.raises(ConfigError, match=r"zero_optimization.zero_quantized_weights: True: ember does not implement"):
        TrainConfig.from_dict({**base, "zero_optimization": {"stage": 3, "zero_quantized_weights": True}})
    with pytest.raises(ConfigError, match=r"zero_stage: 3 contradicts|zero_optimization.stage: 2 contradicts"):
        TrainConfig.from_dict({**base, "zero_stage": 3, "zero_optimization": {"stage": 2}})


def test_native_yaml_keeps_the_cosine_default_and_can_choose(train_assets, tmp_path):
    base = ember_sections(train_assets, tmp_path)
    assert TrainConfig.from_dict(base).scheduler.type == "cosine"
    config = TrainConfig.from_dict({**base, "optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9},
                                    "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 50}}})
    assert config.optimizer.type == "sgd" and config.scheduler.params["warmup_max_lr"] == 0.001  # DeepSpeed's default
    with pytest.raises(ConfigError, match=r"scheduler.params.total_num_steps: required by WarmupCosineLR"):
        TrainConfig.from_dict({**base, "scheduler": {"type": "WarmupCosineLR"}})


# ---- optimizers --------------------------------------------------------------------------------------------------

def ds_optimizer(train_assets, tmp_path, section) -> OptimSpec:
    return TrainConfig.from_dict({**ember_sections(train_assets, tmp_path), "optimizer": section}).optimizer


def build(spec: OptimSpec) -> torch.optim.Optimizer:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cls, kwargs = optimizer_args(spec)
    return cls(param_groups(model, spec.weight_decay), **kwargs)


def test_deepspeed_optimizer_types_and_defaults(train_assets, tmp_path):
    adam = ds_optimizer(train_assets, tmp_path, {"type": "Adam", "params": {"lr": 1e-4}})
    assert (adam.type, adam.betas, adam.eps, adam.weight_decay) == ("adamw", (0.9, 0.999), 1e-8, 0.0)
    assert type(build(adam)) is torch.optim.AdamW
    l2 = ds_optimizer(train_assets, tmp_path, {"type": "Adam", "params": {"adam_w_mode": False, "weight_decay": 0.1}})
    assert l2.type == "adam" and type(build(l2)) is torch.optim.Adam
    assert build(l2).param_groups[0]["weight_decay"] == 0.1 and build(l2).param_groups[1]["weight_decay"] == 0.0
    sgd = ds_optimizer(train_assets, tmp_path, {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}})
    opt = build(sgd)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 0
    lion = ds_optimizer(train_assets, tmp_path, {"type": "Lion", "params": {"lr": 1e-4, "weight_decay": 0.1}})
    assert type(build(lion)) is Lion and lion.betas == (0.9, 0.999)
    for section, pattern in [
        ({"type": "Lamb", "params": {}}, r"'Lamb' is not supported \(ember implements Adam, AdamW, SGD, Lion\)"),
        ({"type": "rmsprop", "lr": 0.1}, r"'rmsprop' is not supported \(one of adamw, adam, sgd, lion\)"),
        ({"type": "AdamW", "params": {"max_grad_norm": 1.0}}, r"gradient_clipping"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            ds_optimizer(train_assets, tmp_path, section)


def test_lion_step_matches_its_formula():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, 0.25])
    opt.step()
    # m = 0: update = sign(0.1 g) = (1, 1); p <- p (1 - lr wd) - lr update; m <- 0.01 g
    assert torch.allclose(p.detach(), torch.tensor([1.0 * 0.95 - 0.1, -2.0 * 0.95 - 0.1]))
    assert torch.allclose(opt.state[p]["exp_avg"], torch.tensor([0.005, 0.0025]))


# ---- schedules: factor(step) is DeepSpeed's lr at last_batch_iteration = step - 1, over the optimizer's lr ------

def factors(kind, params, steps, lr=0.01, max_steps=100):
    full, problems = resolve(kind, params, lr, max_steps)
    assert not problems
    f = lr_factor(kind, full, lr, max_steps)
    return [f(s) for s in steps]


def close(got, expected):
    return all(math.isclose(g, e, rel_tol=1e-9, abs_tol=1e-12) for g, e in zip(got, expected, strict=True))


def test_warmup_lr_log_and_linear():
    # log: gamma(k) = ln(k + 1) / ln(W); k = -1 (the first step) gives warmup_min_lr
    got = factors("WarmupLR", {"warmup_max_lr": 0.01, "warmup_num_steps": 4}, [0, 1, 2, 3, 4, 5, 50])
    assert close(got, [0, 0, 0.5, math.log(3) / math.log(4), 1, 1, 1])
    got = factors("WarmupLR", {"warmup_min_lr": 0.002, "warmup_num_steps": 4}, [0, 2])  # max: the optimizer's lr
    assert close(got, [0.2, 0.6])
    got = factors("WarmupLR", {"warmup_num_steps": 4, "warmup_type": "linear"}, [0, 1, 2, 4, 5, 9])
    assert close(got, [0, 0, 0.25, 0.75, 1, 1])
    assert close(factors("WarmupLR", {"warmup_num_steps": 0}, [0, 1, 7]), [1, 1, 1])  # ember: 0 is no warmup


def test_warmup_decay_lr():
    # warmup (linear, W = 2) then (T - k) / (T - W) down to 0 at total_num_steps
    got = factors("WarmupDecayLR", {"warmup_max_lr": 0.01, "warmup_num_steps": 2, "warmup_type": "linear",
                                    "total_num_steps": 10}, [0, 1, 2, 3, 7, 11, 12])
    assert close(got, [0, 0, 0.5, 1, 0.5, 0, 0])


def test_warmup_cosine_lr():
    params = {"total_num_steps": 10, "warmup_num_steps": 2, "warmup_type": "linear", "warmup_min_ratio": 0.1,
              "cos_min_ratio": 0.01}
    got = factors("WarmupCosineLR", params, [0, 1, 2, 3, 10, 20])
    # k = -1: 0 (DeepSpeed's first step); warmup: 0.1 + 0.9 k / 2; then 0.01 + 0.99 (1 + cos(pi (k - 1) / 8)) / 2
    assert close(got, [0, 0.1, 0.55, 0.01 + 0.99 * (1 + math.cos(math.pi / 8)) / 2, 0.01, 0.01])


def test_one_cycle_lr_and_momentum():
    params = {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_first_step_size": 4, "cycle_min_mom": 0.85,
              "cycle_max_mom": 0.95}
    # batch b = k + 1 = step: up over 4 steps, down over 4, then cycle_min_lr (no decay configured)
    got = factors("OneCycle", params, [0, 1, 4, 6, 8, 9])
    assert close(got, [0.1, 0.325, 1, 0.55, 0.1, 0.1])
    decayed = factors("OneCycle", {**params, "decay_lr_rate": 0.5, "decay_step_size": 2}, [11])
    assert close(decayed, [0.1 / (1 + 0.5 * 3 / 2)])
    full, _ = resolve("OneCycle", params, 0.01, 100)
    momentum = one_cycle_momentum(full)
    assert close([momentum(s) for s in (0, 1, 4, 9)], [0.85, 0.925, 0.85, 0.95])
    stairs = factors("OneCycle", {**params, "cycle_first_stair_count": 2}, [1, 2, 3, 4])
    assert close(stairs, [0.1, 0.55, 0.55, 1])


def test_lr_range_test_and_ember_cosine():
    got = factors("LRRangeTest", {"lr_range_test_min_lr": 0.01, "lr_range_test_step_size": 2}, [0, 1, 4])
    assert close(got, [1, 1.5, 3])
    got = factors("LRRangeTest", {"lr_range_test_min_lr": 0.01, "lr_range_test_step_size": 2,
                                  "lr_range_test_staircase": True}, [1, 2, 3])
    assert close(got, [1, 2, 2])
    cosine = lr_factor("cosine", {}, 0.01, 10, warmup_steps=2, min_lr_ratio=0.1)
    assert close([cosine(s) for s in (0, 1, 2, 10)], [0.5, 1, 1, 0.1])
    assert close(factors("constant", {}, [0, 99]), [1, 1])


def test_scheduler_refusals():
    assert "StepLR" in resolve("StepLR", {}, 0.01, 10)[1][0]
    problems = resolve("WarmupLR", {"warmup_max_lr": [0.1, 0.2], "cycle_min_lr": 1, "warmup_type": "exp",
                                    "last_batch_iteration": 5}, 0.01, 10)[1]
    assert len(problems) == 4 and "per-group values are not supported" in problems[0]


def test_built_scheduler_sets_lr_and_one_cycle_betas(train_assets, tmp_path):
    config = TrainConfig.from_dict({**ember_sections(train_assets, tmp_path), "optimizer": {"lr": 0.01}, "scheduler": {
        "type": "OneCycle", "params": {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_first_step_size": 4}}})
    optimizer = build(config.optimizer)
    scheduler = build_scheduler(optimizer, config)
    seen = []
    for _ in range(5):
        seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"]))
        optimizer.step()
        scheduler.step()
    assert close([lr for lr, _ in seen], [0.001, 0.00325, 0.0055, 0.00775, 0.01])
    assert seen[0][1] == (0.8, 0.99) and math.isclose(seen[1][1][0], 0.875)  # DeepSpeed's defaults 0.8 .. 0.9
    assert "momentum" not in scheduler.state_dict()


# ---- the loss scaler ------------------------------------------------------------------------------------------

def test_loss_scaler_follows_deepspeed_rules():
    scaler = LossScaler(LossScaleSpec(initial_scale_power=4, loss_scale_window=2, hysteresis=1, min_loss_scale=4))
    assert float(scaler.scale_loss(torch.tensor(1.5))) == 24.0
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([32.0, 16.0])
    scaler.unscale_([p])
    assert torch.equal(p.grad, torch.tensor([2.0, 1.0]))
    assert scaler.update(False) is False and scaler.scale == 8 and scaler.skipped == 1  # skip, halve
    assert [scaler.update(True) for _ in range(2)] == [True, True] and scaler.scale == 8
    assert scaler.update(True) and scaler.scale == 16  # the window's clean steps: double
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 4  # never below min_loss_scale ...
    with pytest.raises(RuntimeError, match="minimum loss scale"):
        scaler.update(False)  # ... and an overflow there ends the run, as in DeepSpeed
    static = LossScaler(LossScaleSpec(loss_scale=128))
    assert static.update(False) is False and static.scale == 128
    off = LossScaler(None)
    loss = torch.tensor(2.0)
    assert off.scale_loss(loss) is loss and off.update(False) is True and off.metrics() == {}
