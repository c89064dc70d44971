"""RL bridge: weights pushed in memory, and trainer/engine log-probabilities that agree."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ember import LLM, SamplingParams
from ember.train.config import TrainConfig
from ember.train.trainer import Trainer
from tests.train.conftest import write_config


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def trained(llama_dir, train_assets, tmp_path_factory):
    """A trainer fine-tuning the tiny Llama for 3 steps (one process), and an engine on the original weights."""
    directory = tmp_path_factory.mktemp("rl")
    path = write_config(directory, train_assets, max_steps=3, model={"path": str(llama_dir)},
                        optimizer={"lr": 0.01, "warmup_steps": 0})
    raw = yaml.safe_load(path.read_text())
    for key in ("tokenizer", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        raw["model"].pop(key, None)
    path.write_text(yaml.safe_dump(raw))
    trainer = Trainer(TrainConfig.load(path))
    trainer.fit()
    return trainer


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 32, 40, 9)]


def logprob_gaps(trainer, llm) -> tuple[list[float], list]:
    """|engine - trainer| log-probability of every prompt and sampled token, for mixed lengths,
    a shared prefix (prefix caching on) and the same prompt twice."""
    batch = prompts() + [prompts()[2][:20] + [7, 8, 9], prompts()[3]]
    outs = llm.generate(batch, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=0,
                                              logprobs=0), use_tqdm=False)
    full = [p + o.outputs[0].token_ids for p, o in zip(batch, outs)]
    reference = trainer.logprobs(full)
    gaps = []
    for p, o, ref in zip(batch, outs, reference):
        engine = [o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))]
        engine += [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)][:-1]
        gaps += [abs(a - b) for a, b in zip(engine, ref)]
    return gaps, outs


def test_push_then_engine_logprobs_equal_trainer(trained, llama_dir):
    from ember.rl import push_weights

    llm = LLM(str(llama_dir), dtype="float32")
    before = llm.generate(prompts()[:1], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    result = push_weights(trained, llm.engine)
    assert result["weight_version"] == 1 and result["bytes"] > 0
    gaps, outs = logprob_gaps(trained, llm)
    assert all(o.weight_version == 1 for o in outs)
    assert max(gaps) < 1e-5, max(gaps)
    old = before.prompt_logprobs[1][prompts()[0][1]].logprob
    new = outs[0].prompt_logprobs[1][prompts()[0][1]].logprob
    assert abs(old - new) > 1e-4  # the weights really changed


def test_bf16_engine_logprobs_close_to_bf16_trainer(trained, llama_dir):
    """bf16 engine (bf16 weights, ember's bf16 kernels) against the trainer's bf16 autocast forward
    (fp32 master weights): agreement as close as bf16 rounding allows (figures in BENCHMARKS.md)."""
    from ember.rl import push_weights

    llm = LLM(str(llama_dir), dtype="bfloat16")
    push_weights(trained, llm.engine)
    precision = trained.config.precision
    object.__setattr__(trained.config, "precision", "bf16")
    try:
        gaps, _ = logprob_gaps(trained, llm)
    finally:
        object.__setattr__(trained.config, "precision", precision)
    print(f"bf16 |engine - trainer| logprob: max {max(gaps):.4f}, mean {sum(gaps) / len(gaps):.4f} over {len(gaps)}")
    assert max(gaps) < 0.05 and sum(gaps) / len(gaps) < 0.005, (max(gaps), sum(gaps) / len(gaps))


def test_sleep_frees_the_kv_cache_and_wake_restores(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_gib=0.25, device="cpu")  # RSS: host memory
    params = SamplingParams(max_tokens=12, temperature=0)
    before = llm.generate(prompts(), params, use_tqdm=False)
    caches = llm.engine.runner.kv_caches
    cache_bytes = sum(t.numel() * t.element_size() for pair in caches for t in pair)
    for pair in caches:
        for t in pair:
            t.fill_(0)  # commit every page, so freeing them is visible in RSS
    del caches, pair, t
    high = rss_bytes()
    llm.engine.sleep()
    gc.collect()
    low = rss_bytes()
    assert high - low >= 0.9 * cache_bytes, (high, low, cache_bytes)
    with pytest.raises(ValueError, match="asleep"):
        llm.generate(["x"], params, use_tqdm=False)
    llm.engine.wake()
    after = llm.generate(prompts(), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in before]


def test_update_weights_by_hf_name_and_errors(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    weight = llm.engine.model.model.layers[0].self_attn.qkv_proj.weight
    q_rows = llm.engine.model_config.num_heads * llm.engine.model_config.head_dim
    new_q = torch.full((q_rows, weight.shape[1]), 0.5)
    assert llm.engine.update_weights({"model.layers.0.self_attn.q_proj.weight": new_q}) == 1
    assert torch.equal(weight[:q_rows].cpu(), new_q)
    with pytest.raises(ValueError, match="no tensor matched"):
        llm.engine.update_weights({"nonsense": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        llm.engine.update_weights({"model.norm.weight": torch.zeros(3)})


@pytest.mark.parametrize("stage", [3])
def test_fsdp_zero3_push_on_two_processes(stage, llama_dir, train_assets, tmp_path):
    config = write_config(tmp_path, train_assets, max_steps=2, zero_stage=stage, model={"path": str(llama_dir)})
    raw = yaml.safe_load(config.read_text())
    for key in ("tokenizer", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        raw["model"].pop(key, None)
    config.write_text(yaml.safe_dump(raw))
    script = Path(__file__).with_name("zero3_push.py")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(config), str(tmp_path / "result.json")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # two CPU ranks, even beside a GPU
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["max_abs_diff"] < 1e-5 and result["weight_version"] == 1
