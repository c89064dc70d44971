"""ZeRO stages on 2 real processes (gloo) against 1 process with the same global batch."""

import pytest

from tests.train.conftest import losses, train, write_config


@pytest.fixture(scope="module")
def reference(train_assets, tmp_path_factory):
    """One process, stage 0, 20 steps, checkpoint at step 10."""
    directory = tmp_path_factory.mktemp("reference")
    return train(write_config(directory, train_assets, save_interval=10), nproc=1), directory


def assert_same_losses(got, expected, rel=1e-4):
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= rel * abs(loss), f"step {step}: {got[step]} vs {loss}"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_on_two_processes_matches_one(stage, reference, train_assets, tmp_path):
    records = train(write_config(tmp_path, train_assets, zero_stage=stage), nproc=2)
    assert_same_losses(losses(records), losses(reference[0]))
    assert losses(records)[20] < losses(records)[1]  # it learns


@pytest.mark.slow  # two 2-process runs; the stage matrix above covers the default path
def test_gradient_accumulation_and_offload(reference, train_assets, tmp_path):
    accum = train(write_config(tmp_path / "accum", train_assets, zero_stage=2, micro_batch_size=1), nproc=2)
    assert_same_losses(losses(accum), losses(reference[0]))  # 1 x 4 micro-batches x 2 ranks = 8
    offload = train(write_config(tmp_path / "offload", train_assets, zero_stage=3, offload_optimizer=True,
                                 offload_params=True), nproc=2)
    assert_same_losses(losses(offload), losses(reference[0]))


@pytest.mark.parametrize("stage", [3, 1])
def test_resume_on_another_world_size(reference, train_assets, tmp_path, stage):
    """Stage 0 on 1 process -> stage 3 or 1 on 2 (ZeRO-1's optimizer state maps to names in the optimizer's
    own order, decayed parameters first, not the model's)."""
    records, directory = reference
    checkpoint = directory / "run" / "checkpoints" / "step-10"
    assert checkpoint.is_dir()
    resumed = train(write_config(tmp_path, train_assets, zero_stage=stage, resume=str(checkpoint)), nproc=2)
    got = losses(resumed)
    assert sorted(got) == list(range(11, 21))
    assert_same_losses(got, {s: l for s, l in losses(records).items() if s > 10})


@pytest.mark.slow  # four 2-process runs
def test_stage3_memory_and_estimate(reference, train_assets, tmp_path):
    from ember.train.config import TrainConfig
    from ember.train.estimate import estimate
    from ember.train.trainer import preflight

    one = reference[0][0]["rank_model_state_bytes"][0]
    for stage in (0, 1, 2, 3):
        config_path = write_config(tmp_path / f"s{stage}", train_assets, zero_stage=stage, max_steps=2)
        records = train(config_path, nproc=2)
        measured = records[0]["rank_model_state_bytes"]
        config = TrainConfig.load(config_path)
        _, mc = preflight(config, 2)
        predicted = estimate(config, mc, 2).ember_bytes
        for rank_bytes in measured:
            assert abs(rank_bytes - predicted) <= 0.15 * predicted, (stage, rank_bytes, predicted)
        if stage == 3:
            assert max(measured) <= 0.6 * one


@pytest.mark.slow
def test_zero3_starts_sharded(model_factory, train_assets, tmp_path):
    """ZeRO-3 builds the model on the meta device and each rank materialises only its shard: the
    start-up peak per rank (over what the process held before the model) is at most 0.6x the whole
    fp32 model on 2 processes; ZeRO-0 holds at least the whole model."""
    import os

    from tests.train.test_families import fine_tune_config

    hf_dir = model_factory("llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=24, vocab_size=4096,
                           num_attention_heads=8, num_key_value_heads=4)
    fp32_bytes = os.path.getsize(hf_dir / "model.safetensors")  # written in float32
    runs = {}
    for stage in (0, 3):
        records = train(fine_tune_config(tmp_path / str(stage), train_assets, hf_dir, zero_stage=stage, max_steps=1,
                                         micro_batch_size=2, global_batch_size=4), nproc=2)
        runs[stage] = records[0]
    assert runs[3]["loss"] == pytest.approx(runs[0]["loss"], abs=1e-5)
    assert max(runs[3]["rank_model_startup_bytes"]) <= 0.6 * fp32_bytes, runs[3]["rank_model_startup_bytes"]
    assert min(runs[0]["rank_model_startup_bytes"]) >= fp32_bytes
