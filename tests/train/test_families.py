"""Round 2's families in `ember train`: fine-tuned under ZeRO-3 on 2 real processes they give 1 process's
losses, export to a directory transformers loads, and the engine's log-probabilities agree with the
trainer's (the RL bridge's contract)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import VOCAB, load_hf
from tests.train.conftest import losses, train, write_config

# sandwich + offset norms, q/k norms, local/global rope | sinks, biased router, clamped SwiGLU | fused Phi-3 names
FAMILIES = ["gemma3", "gpt_oss", "phi3"]


def fine_tune_config(directory, train_assets, hf_dir, **overrides):
    overrides = {"max_steps": 6, "optimizer": {"lr": 0.003, "warmup_steps": 0}, **overrides}
    path = write_config(directory, train_assets, model={"path": str(hf_dir)}, **overrides)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"path": str(hf_dir)}  # the directory's own config and tokenizer
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("arch", [FAMILIES[0], *(pytest.param(a, marks=pytest.mark.slow) for a in FAMILIES[1:])])
def test_zero3_on_two_processes_matches_one_and_exports(model_factory, train_assets, tmp_path, arch):
    hf_dir = model_factory(arch, std=0.1)
    one = train(fine_tune_config(tmp_path / "one", train_assets, hf_dir), nproc=1)
    two = train(fine_tune_config(tmp_path / "two", train_assets, hf_dir, zero_stage=3), nproc=2)
    expected, got = losses(one), losses(two)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-4 * abs(loss), (step, got[step], loss)
    assert got[6] < got[1]

    out = tmp_path / "export"
    checkpoint = tmp_path / "two" / "run" / "checkpoints" / "final"
    subprocess.run([sys.executable, "-m", "ember.cli", "train", "export", str(checkpoint), str(out)], check=True,
                   capture_output=True)
    from ember.models import load_model

    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    ours, _ = load_model(out, dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), load_hf(out)(ids).logits, rtol=1e-4, atol=1e-4)


def test_engine_logprobs_equal_the_trainers(model_factory, train_assets, tmp_path):
    """gpt-oss (sinks, a window, MoE): after a push of the trainer's weights, every prompt and sampled
    token's engine log-probability is within 1e-5 of the training forward's."""
    from ember import LLM, SamplingParams
    from ember.rl import push_weights
    from ember.train.config import TrainConfig
    from ember.train.trainer import Trainer

    hf_dir = model_factory("gpt_oss", std=0.1)
    trainer = Trainer(TrainConfig.load(fine_tune_config(tmp_path, train_assets, hf_dir, max_steps=2)))
    trainer.fit()
    llm = LLM(str(hf_dir), dtype="float32")
    push_weights(trainer, llm)
    g = torch.Generator().manual_seed(5)
    batch = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 20, 33)]
    outs = llm.generate(batch, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, prompt_logprobs=0,
                                              logprobs=0), use_tqdm=False)
    reference = trainer.logprobs([p + o.outputs[0].token_ids for p, o in zip(batch, outs)])
    for p, o, ref in zip(batch, outs, reference):
        engine = [o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))]
        engine += [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)][:-1]
        assert max(abs(a - b) for a, b in zip(engine, ref)) < 1e-5
