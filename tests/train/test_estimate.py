"""`ember train estimate`: its formula pieces against what the code holds (fast), and its peak against
measured training runs on 2 processes, ZeRO stages 0-3 (slow)."""

import json

import pytest
import torch

from tests.train.conftest import train, write_config


def small_config(**overrides):
    from ember.models import ModelConfig

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
          "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 128, "torch_dtype": "float32", **overrides}
    return ModelConfig.from_hf(hf, source="test")


def saved_bytes(fn, model) -> tuple[int, object]:
    """(bytes of the distinct storages autograd saves while `fn` runs, the model's parameters left out,
    what `fn` returns)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
def test_block_activations_are_what_autograd_saves(mode):
    """A decoder block's saved activations per token (the estimate's formula) equal the bytes autograd
    saves for ember's Llama block: fp32, bf16 parameters (FSDP's mixed precision) and bf16 autocast
    (ZeRO-0/1), where the 16-bit weight copies are saved too (the estimate's autocast term)."""
    from ember.models import model_class
    from ember.train.estimate import model_shapes

    mc = small_config()
    torch.manual_seed(0)
    model = model_class(mc.architecture)(mc).train()
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    layer = model.model.layers[0]
    batch, seq = 2, 16
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    x = torch.randn(batch, seq, mc.hidden_size, dtype=dtype, requires_grad=True)
    rotary = next(iter(model.model.rotaries.values()))
    cos, sin = rotary(torch.arange(seq).expand(batch, seq), dtype)
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")

    def forward():
        with context:
            return layer(x, cos, sin, None)

    got, _ = saved_bytes(forward, model)
    shapes = model_shapes(mc)
    rotary_tables = 2 * batch * seq * mc.head_dim * (2 if mode == "bf16" else 4)  # shared by every block
    expected = batch * seq * shapes.layer_bytes_per_token[1 if mode == "fp32" else 0] + rotary_tables
    if mode == "autocast":
        expected += 2 * shapes.block_linear_weights // mc.num_layers
    assert got == pytest.approx(expected, rel=0.02), (got, expected)


def test_loss_buffers_are_what_the_fused_loss_saves():
    """The SFT loss keeps an fp32 [vocab, hidden] head-gradient buffer and the hidden states' gradient
    from forward to backward (ember.models.loss), the estimate's `loss_saved`."""
    from ember.models import model_class

    mc = small_config()
    model = model_class(mc.architecture)(mc).train()
    tokens = torch.randint(0, mc.vocab_size, (2, 16))
    got, _ = saved_bytes(lambda: model(tokens, labels=tokens, reduction="sum"), model)
    hidden = 2 * 16 * mc.hidden_size * 4
    activations, _ = saved_bytes(lambda: model.model(tokens, torch.arange(16).expand(2, 16), None), model)
    head_buffer = 4 * mc.vocab_size * mc.hidden_size
    assert got - activations == pytest.approx(head_buffer + hidden, rel=0.05), (got - activations, head_buffer)


def phases_for(tmp_path, train_assets, ranks=2, **overrides):
    from ember.train.config import TrainConfig
    from ember.train.estimate import estimate
    from ember.train.trainer import preflight

    config = TrainConfig.load(write_config(tmp_path, train_assets, **overrides))
    _, mc = preflight(config, ranks)
    return estimate(config, mc, ranks)


def test_phases(train_assets, tmp_path):
    """The terms each stage adds: DDP's buckets (0/1 on several ranks), FSDP's gathered parameters at
    the loss (stage 2 the root and every block, stage 3 the root), autocast's weight copies; activation
    checkpointing lowers the activations; the model states keep the ZeRO paper's layout."""
    est = {stage: phases_for(tmp_path / str(stage), train_assets, zero_stage=stage) for stage in range(4)}
    psi = est[0].num_params
    assert est[0].ember_bytes == 16 * psi and est[3].ember_bytes == 16 * psi // 2
    assert est[1].optimizer_bytes == 8 * psi // 2
    assert est[0].buffer_bytes == est[1].buffer_bytes == 4 * psi and est[2].buffer_bytes == 0
    one = phases_for(tmp_path / "one", train_assets, ranks=1, zero_stage=0)
    assert one.buffer_bytes == 0  # one process trains the bare model: no DDP
    assert est[2].gathered_bytes > est[3].gathered_bytes > 0 == est[1].gathered_bytes
    assert est[0].peak_bytes > est[1].peak_bytes > est[3].peak_bytes
    checkpointed = phases_for(tmp_path / "ac", train_assets, zero_stage=0, activation_checkpointing=True)
    assert checkpointed.activation_bytes < est[0].activation_bytes
    bf16 = phases_for(tmp_path / "bf16", train_assets, zero_stage=0, precision="bf16")
    assert bf16.phases["forward"]["autocast weight copies"] > 0
    for e in est.values():
        assert e.peak_bytes == max(sum(t.values()) for t in e.phases.values())


def test_cli_prints_the_phases(train_assets, tmp_path, capsys):
    from ember.cli import main

    config = write_config(tmp_path, train_assets, zero_stage=3)
    assert main(["train", "estimate", str(config), "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "peak per rank (ember)" in out and "optimizer step" in out and "backward end" in out


# The slow check: a model whose tensors, not the process's fixed overhead, make most of the peak.
MEASURED_MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "vocab_size": 4096}


@pytest.mark.slow  # four 2-process runs (~2 min)
def test_estimate_within_15_percent_of_the_measured_peak(train_assets, tmp_path, monkeypatch):
    """`rank_model_peak_bytes` (the resident peak since the model was built, less the library pages mapped
    meanwhile) of a 2-process run is within 15% of the estimate's peak at every ZeRO stage. glibc's malloc is told to return freed blocks
    (a fixed mmap threshold): by default it keeps freed blocks under 32 MiB in its heap once it has
    freed a larger one, which puts the resident peak 8-65% above the live one (BENCHMARKS.md), by an
    amount that grows with the steps and that no formula of the model predicts."""
    from ember.bench.models import write_tokenizer
    from ember.train.config import TrainConfig
    from ember.train.estimate import estimate
    from ember.train.trainer import preflight

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # inherited by `ember train` and its workers
    write_tokenizer(tmp_path / "tok", vocab_size=MEASURED_MODEL["vocab_size"])
    model = {"tokenizer": str(tmp_path / "tok"), **MEASURED_MODEL, "max_position_embeddings": 256}
    ratios = {}
    for stage in (0, 1, 2, 3):
        path = write_config(tmp_path / f"s{stage}", train_assets, model=model, zero_stage=stage, max_steps=3,
                            data={"seq_len": 128})
        records = train(path, nproc=2)
        measured = max(records[-1]["rank_model_peak_bytes"])
        config = TrainConfig.load(path)
        _, mc = preflight(config, 2)
        predicted = estimate(config, mc, 2).peak_bytes
        ratios[stage] = measured / predicted
    print(json.dumps(ratios))
    assert all(abs(r - 1) <= 0.15 for r in ratios.values()), ratios
