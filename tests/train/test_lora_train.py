"""LoRA fine-tuning: only the adapter trains and is checkpointed; the adapter it writes is PEFT's (HF PEFT
loads it with the same logits, ember serves it with the same logprobs); ZeRO-3 on 2 processes matches one
process; a merged export equals base + adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ember import LLM, SamplingParams
from ember.engine.lora import LoRARequest
from tests.conftest import load_hf
from tests.train.conftest import losses, train

peft = pytest.importorskip("peft")


def lora_config(directory: Path, base: Path, assets: Path, **overrides) -> Path:
    config = {
        "model": {"path": str(base)},
        "data": {"train": [str(assets / "train.txt")], "seq_len": 32},
        "run_dir": str(directory / "run"),
        "micro_batch_size": 4, "global_batch_size": 8, "max_steps": 12, "seed": 0, "device": "cpu",
        "optimizer": {"lr": 0.01, "warmup_steps": 2},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        **overrides,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def lora_run(model_factory, train_assets, tmp_path_factory):
    base = model_factory("llama", std=0.1)
    directory = tmp_path_factory.mktemp("lora-run")
    records = train(lora_config(directory, base, train_assets), nproc=1)
    return base, directory / "run" / "checkpoints" / "final", records


def test_only_the_adapter_trains_and_is_checkpointed(lora_run):
    import torch.distributed.checkpoint as dcp

    base, checkpoint, records = lora_run
    assert losses(records)[12] < losses(records)[1]  # it learns
    keys = list(dcp.FileSystemReader(str(checkpoint / "dcp")).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora." in k for k in model_keys), model_keys[:5]  # no base weight saved
    # 2 layers x (q, k, v, o, gate, up, down): A and B each
    assert len(model_keys) == 2 * 7 * 2


def test_the_adapter_is_peft_and_ember_serves_it(lora_run):
    base, checkpoint, _ = lora_run
    adapter = checkpoint / "adapter"
    reference = peft.PeftModel.from_pretrained(load_hf(base), adapter).eval()
    prompt = list(range(3, 40))
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        base_lp = load_hf(base)(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    want = [want[i - 1, t].item() for i, t in enumerate(prompt) if i]
    assert max(abs(a - b[t].item()) for a, b, t in zip(want, base_lp, prompt[1:])) > 1e-3  # it changed the model
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_lora_rank=8)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False,
                       lora_request=LoRARequest("trained", 1, str(adapter)))[0]
    got = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


def test_merged_export_equals_base_plus_adapter(lora_run, tmp_path):
    from ember.train.checkpoint import export_checkpoint

    base, checkpoint, _ = lora_run
    merged = export_checkpoint(checkpoint, tmp_path / "merged", merge=True)
    prompt = torch.tensor([list(range(3, 30))])
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(load_hf(base), checkpoint / "adapter").eval()(prompt).logits
        got = load_hf(merged)(prompt).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    adapter_only = export_checkpoint(checkpoint, tmp_path / "adapter")
    assert (adapter_only / "adapter_config.json").is_file() and (adapter_only / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # a 2-process run
def test_zero3_on_two_processes_matches_one(lora_run, model_factory, train_assets, tmp_path):
    base, _, records = lora_run
    sharded = train(lora_config(tmp_path, base, train_assets, zero_stage=3), nproc=2)
    for step, loss in losses(records).items():
        assert abs(losses(sharded)[step] - loss) <= 1e-4 * abs(loss), (step, losses(sharded)[step], loss)


@pytest.mark.slow  # four training runs, three of them on 2 processes (~50 s)
def test_zero1_resume_and_qlora(lora_run, train_assets, tmp_path):
    """ZeRO-1 on 2 processes resumes its own checkpoint (the optimizer state by name, in the optimizer's own
    order) to the uninterrupted losses; an int8 base (QLoRA) learns, and the estimate counts its bytes."""
    from ember.train.config import TrainConfig
    from ember.train.estimate import estimate, lora_counts
    from ember.train.trainer import preflight

    base, _, records = lora_run
    first = train(lora_config(tmp_path / "a", base, train_assets, zero_stage=1, save_interval=6), nproc=2)
    checkpoint = tmp_path / "a" / "run" / "checkpoints" / "step-6"
    resumed = train(lora_config(tmp_path / "b", base, train_assets, zero_stage=1, resume=str(checkpoint)), nproc=2)
    assert sorted(losses(resumed)) == list(range(7, 13))
    for step, loss in losses(resumed).items():
        assert abs(losses(first)[step] - loss) <= 1e-4 * abs(loss), (step, loss, losses(first)[step])
    qlora_path = lora_config(tmp_path / "q", base, train_assets,
                             lora={"r": 4, "lora_alpha": 8, "base_quantization": "int8"})
    q = losses(train(qlora_path, nproc=1))
    assert q[12] < q[1]
    config = TrainConfig.load(qlora_path)
    _, mc = preflight(config, 1)
    counts = lora_counts(mc, config.lora)
    assert counts.trainable == 2 * (4 * (64 + 64) + 2 * 4 * (64 + 32) + 4 * (64 + 64) + 2 * 4 * (64 + 128)
                                    + 4 * (128 + 64))
    quantized = estimate(config, mc, 1, counts)
    plain = estimate(TrainConfig.load(lora_config(tmp_path / "p", base, train_assets)), mc, 1, counts)
    assert quantized.params_bytes < plain.params_bytes
