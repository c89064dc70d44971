"""DPO: preference records, the loss and its gradients against transformers, and runs that learn the preference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from ember.tokenizer import Tokenizer
from ember.train.config import ConfigError, DataSpec, DPOSpec, TrainConfig
from ember.train.dpo import build_pair_datasets, dpo_loss
from tests.train.conftest import train, write_config

PROMPT = [{"role": "user", "content": "Two plus two?"}]
GOOD = [{"role": "assistant", "content": "Four."}]
BAD = [{"role": "assistant", "content": "Five."}]


def _scored(tokenizer, data, pair: int, side: int) -> str:
    ids, mask = data.sequences[2 * pair + side]
    return tokenizer.decode([int(t) for t, m in zip(ids, mask) if m], skip_special_tokens=False)


def test_record_shapes_score_only_the_completions(train_assets, tmp_path):
    tokenizer = Tokenizer(train_assets / "tok")
    records = [
        {"prompt": "Q: two plus two? A:", "chosen": " four", "rejected": " five"},
        {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD},  # TRL's conversational shape
        {"chosen": PROMPT + GOOD, "rejected": PROMPT + BAD},  # whole conversations: the last turn differs
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data, held = build_pair_datasets(DataSpec(train=(str(path),), seq_len=64, eval_fraction=0.0), tokenizer, None)
    assert len(data) == 3 and held is None
    eos = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
    assert _scored(tokenizer, data, 0, 0) == " four" + eos and _scored(tokenizer, data, 0, 1) == " five" + eos
    for pair in (1, 2):
        assert _scored(tokenizer, data, pair, 0) == "Four.<|im_end|>\n" + eos
        assert _scored(tokenizer, data, pair, 1) == "Five.<|im_end|>\n" + eos
    inputs, labels, pairs = data.batch([2, 0])
    assert inputs.shape == labels.shape and inputs.shape[0] == 4 and pairs.tolist() == [2, 0]
    # rows: chosen of pair 2, chosen of pair 0, rejected of pair 2, rejected of pair 0
    assert tokenizer.decode(labels[1][labels[1] != -100].tolist()) == " four"


def test_bad_records_and_config(train_assets, tmp_path):
    tokenizer = Tokenizer(train_assets / "tok")
    for record, words in (({"prompt": "x", "chosen": "y"}, "'chosen' and 'rejected'"),
                          ({"prompt": "x", "chosen": 1, "rejected": "z"}, "must be strings"),
                          ({"prompt": PROMPT, "chosen": PROMPT, "rejected": BAD}, "no assistant message")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(ConfigError, match=words):
            build_pair_datasets(DataSpec(train=(str(path),)), tokenizer, None)
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        DPOSpec(loss_type="hinge2")
    with pytest.raises(ConfigError, match="dpo.beta"):
        TrainConfig.from_dict({"model": {"tokenizer": "t"}, "data": {"train": "x"}, "objective": "dpo",
                               "dpo": {"beta": 0}})
    assert TrainConfig.from_dict({"model": {"tokenizer": "t"}, "data": {"train": "x"},
                                  "objective": "dpo"}).dpo == DPOSpec()


def test_losses_match_their_formulas():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-3.0, -1.0], [-4.0, -0.5], [-3.5, -1.0], [-3.5, -1.0]))
    margin = (pc - rc) - (pr - rr)
    sigmoid, rewards = dpo_loss(pc, pr, rc, rr, DPOSpec(beta=0.2))
    assert torch.allclose(sigmoid, -F.logsigmoid(0.2 * margin))
    assert torch.allclose(rewards["chosen_reward"], 0.2 * (pc - rc))
    ipo, _ = dpo_loss(pc, pr, rc, rr, DPOSpec(beta=0.2, loss_type="ipo"))
    assert torch.allclose(ipo, (margin - 2.5) ** 2)
    smoothed, _ = dpo_loss(pc, pr, rc, rr, DPOSpec(beta=0.2, label_smoothing=0.1))
    assert torch.allclose(smoothed, -0.9 * F.logsigmoid(0.2 * margin) - 0.1 * F.logsigmoid(-0.2 * margin))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_gradients_equal_transformers(model_factory, tmp_path, loss_type):
    """The trainer's DPO loss and gradients on a batch of pairs equal a direct computation from
    transformers' log-probabilities (fp32, 1e-5), with a reference model that differs from the policy."""
    from ember.models import load_model
    from ember.models.loader import hf_parameter_map
    from ember.train.trainer import Trainer
    from tests.conftest import load_hf

    policy_dir, reference_dir = model_factory("llama", std=0.1), model_factory("llama", seed=1, std=0.1)
    tokenizer = Tokenizer(policy_dir)
    path = tmp_path / "pairs.jsonl"
    words = ["alpha", "beta gamma", "delta", "epsilon zeta eta", "theta"]
    path.write_text("".join(json.dumps({"prompt": f"Say {w}:", "chosen": f" {w}.", "rejected": f" not {w}!"}) + "\n"
                            for w in words))
    spec = DPOSpec(beta=0.3, loss_type=loss_type)
    data, _ = build_pair_datasets(DataSpec(train=(str(path),), eval_fraction=0.0), tokenizer, None)
    inputs, labels, pairs = data.batch(np.arange(len(data)))
    average = loss_type == "ipo"

    def hf_logps(model) -> torch.Tensor:
        logps = model(inputs).logits.float().log_softmax(-1)
        mask = labels != -100
        token = logps.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
        return token.sum(-1) / (mask.sum(-1) if average else 1)

    with torch.no_grad():
        reference = hf_logps(load_hf(reference_dir))
    data.reference = torch.stack([reference[:len(pairs)], reference[len(pairs):]], dim=1)
    trainer = Trainer(TrainConfig.from_dict({"model": {"path": str(policy_dir)}, "data": {"train": [str(path)]},
                                             "objective": "dpo", "dpo": spec.__dict__}))
    trainer.model, _ = load_model(policy_dir, dtype="float32")
    trainer.d = type("D", (), {"device": torch.device("cpu")})()
    trainer._reset_pair_stats()
    ours = trainer._loss((inputs, labels, pairs), data)
    ours.backward()

    hf = load_hf(policy_dir)
    policy = hf_logps(hf)
    b = len(pairs)
    margin = (policy[:b] - reference[:b]) - (policy[b:] - reference[b:])
    theirs = ((margin - 1 / (2 * spec.beta)) ** 2 if average else -F.logsigmoid(spec.beta * margin)).mean()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5
    hf_params = dict(hf.named_parameters())
    compared = 0
    for name, (param, index) in hf_parameter_map(trainer.model).items():
        if name in hf_params and hf_params[name].grad is not None:
            grad = param.grad[index]
            grad = grad.t() if getattr(param, "transposed_checkpoint", False) else grad
            torch.testing.assert_close(grad, hf_params[name].grad, atol=1e-5, rtol=1e-4)
            compared += 1
    assert compared >= 10
    wins = (trainer._pair_record()["reward_accuracy"])
    assert wins == pytest.approx(float((margin > 0).float().mean()))


def _preference_data(tmp_path, count: int) -> str:
    """Pairs where the chosen answer repeats the prompt's word and the rejected one another word:
    the starting (random) model prefers neither."""
    rng = np.random.default_rng(0)
    words = ["apple", "river", "stone", "cloud", "green", "seven", "north", "light"]
    path = tmp_path / "prefs.jsonl"
    with path.open("w") as f:
        for _ in range(count):
            word, other = rng.choice(words, 2, replace=False)
            f.write(json.dumps({"prompt": f"word: {word}. again:", "chosen": f" {word}", "rejected": f" {other}"}) + "\n")
    return str(path)


def _dpo_run(tmp_path, assets, data: str, **overrides) -> list[dict]:
    config = dict(objective="dpo", data={"train": [data], "seq_len": 32, "eval_fraction": 0.2}, max_steps=60,
                  eval_interval=60, optimizer={"lr": 0.005, "warmup_steps": 2})
    nproc = overrides.pop("nproc", 1)
    config.update(overrides)
    return train(write_config(tmp_path, assets, **config), nproc=nproc)


def test_dpo_run_learns_the_preference(train_assets, tmp_path):
    data = _preference_data(tmp_path, 240)
    precomputed = _dpo_run(tmp_path / "pre", train_assets, data, dpo={"beta": 0.5})
    first, last = precomputed[0], precomputed[-1]
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at step 1
    assert last["loss"] < 0.3 and last["reward_margin"] > 0
    assert last["eval_reward_accuracy"] >= 0.9  # held-out pairs: chosen's log-ratio above rejected's
    assert 0 < last["trained_tokens"]
    # A frozen copy scoring the reference in every step gives the same run (fp32).
    live = _dpo_run(tmp_path / "live", train_assets, data, dpo={"beta": 0.5, "reference": "live"})
    for a, b in zip(precomputed, live):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.slow
def test_dpo_on_two_processes_at_zero3_equals_one(train_assets, tmp_path):
    data = _preference_data(tmp_path, 240)
    one = _dpo_run(tmp_path / "one", train_assets, data, max_steps=8)
    two = _dpo_run(tmp_path / "two", train_assets, data, max_steps=8, zero_stage=3, nproc=2)
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["reward_accuracy"] == b["reward_accuracy"]


def test_lora_dpo_reference_is_the_base(model_factory, tmp_path):
    """A LoRA DPO run: the live reference is the base with the adapters off, equal to precomputing it."""
    base = model_factory("llama", std=0.1)
    data = _preference_data(tmp_path, 120)
    runs = {}
    for reference in ("precomputed", "live"):
        config = write_config(tmp_path / reference, base.parent, objective="dpo",
                              dpo={"beta": 0.5, "reference": reference}, lora={"r": 4, "lora_alpha": 8},
                              data={"train": [data], "seq_len": 32, "eval_fraction": 0.0}, max_steps=6,
                              optimizer={"lr": 0.01, "warmup_steps": 0})
        config.write_text(config.read_text().replace(  # the base model, not write_config's from-scratch one
            yaml.safe_dump({"model": yaml.safe_load(config.read_text())["model"]}), yaml.safe_dump({"model": {"path": str(base)}})))
        runs[reference] = train(config)
    assert runs["precomputed"][0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    for a, b in zip(runs["precomputed"], runs["live"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert runs["live"][-1]["loss"] < runs["live"][0]["loss"]
    assert (tmp_path / "live" / "run" / "checkpoints" / "final" / "adapter" / "adapter_config.json").is_file()
