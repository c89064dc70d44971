"""Expert-parallel MoE training on 2 real processes (gloo, all-to-all) against 1 process."""

import pytest
import torch
import yaml

from ember.train.config import ConfigError, TrainConfig
from tests.train.conftest import losses, train, write_config
from tests.train.test_zero import assert_same_losses

MIXTRAL = {"architecture": "MixtralForCausalLM", "num_local_experts": 4, "num_experts_per_tok": 2}


def moe_config(directory, assets, **overrides):
    path = write_config(directory, assets, model=MIXTRAL, **overrides)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["router_aux_loss_coef"] = 0.02
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def moe_reference(train_assets, tmp_path_factory):
    directory = tmp_path_factory.mktemp("moe-reference")
    return train(moe_config(directory, train_assets), nproc=1), directory


def exported(run_dir, out):
    from safetensors.torch import load_file

    from ember.train.checkpoint import export_checkpoint

    export_checkpoint(run_dir / "checkpoints" / "final", out)
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("stage", [0, 3])
def test_expert_parallel_matches_one_process(stage, moe_reference, train_assets, tmp_path):
    records = train(moe_config(tmp_path, train_assets, zero_stage=stage, expert_parallel=True, save_interval=10),
                    nproc=2)
    reference, ref_dir = moe_reference
    assert_same_losses(losses(records), losses(reference))
    # each rank holds half the experts (they are most of this model)
    assert max(records[0]["rank_model_state_bytes"]) < 0.75 * reference[0]["rank_model_state_bytes"][0]
    aux = {r["step"]: r["aux_loss"] for r in records if "aux_loss" in r}
    ref_aux = {r["step"]: r["aux_loss"] for r in reference if "aux_loss" in r}
    assert sorted(aux) == sorted(ref_aux)
    # Reported: the last micro-batch's (rank 0's here, another micro-batch of the same step there).
    mean, ref_mean = sum(aux.values()) / len(aux), sum(ref_aux.values()) / len(ref_aux)
    assert 0.5 < mean < 4 and abs(mean - ref_mean) < 0.05 * ref_mean
    # The checkpoint gathers every rank's experts: the exported model equals the single-process one.
    ours, theirs = exported(tmp_path / "run", tmp_path / "hf"), exported(ref_dir / "run", tmp_path / "hf-ref")
    assert sorted(ours) == sorted(theirs) and any(".experts.3." in name for name in ours)
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=2e-4), name
    if stage == 0:  # the sharded experts and their optimizer state reshard onto one process
        checkpoint = tmp_path / "run" / "checkpoints" / "step-10"
        resumed = train(moe_config(tmp_path / "one", train_assets, resume=str(checkpoint)), nproc=1)
        assert_same_losses(losses(resumed), {s: l for s, l in losses(reference).items() if s > 10})


def test_expert_parallel_config_errors(train_assets, tmp_path):
    from ember.train.trainer import preflight

    with pytest.raises(ConfigError, match="expert_parallel: .*zero_stage 0, 2 or 3"):
        TrainConfig.load(moe_config(tmp_path / "z1", train_assets, zero_stage=1, expert_parallel=True))
    config = TrainConfig.load(moe_config(tmp_path / "odd", train_assets, expert_parallel=True))
    with pytest.raises(ConfigError, match="4 experts do not divide over 3 processes"):
        preflight(config, 3)
    dense = TrainConfig.load(write_config(tmp_path / "dense", train_assets, expert_parallel=True))
    with pytest.raises(ConfigError, match="LlamaForCausalLM has no Mixture-of-Experts"):
        preflight(dense, 2)

