"""Context parallel (Ulysses) training on 2 real processes (gloo, all-to-all) against 1 process."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ember.train.config import ConfigError, TrainConfig
from tests.train.conftest import losses, train, write_config

SEQ = 512


def tiny_llama(kv_heads: int):
    from ember.models import ModelConfig, model_class
    from ember.models.loader import init_random_weights

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 384, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": kv_heads, "max_position_embeddings": SEQ, "torch_dtype": "float32"}
    config = ModelConfig.from_hf(hf, source="model")
    model = model_class("LlamaForCausalLM")(config)
    torch.manual_seed(0)
    init_random_weights(model, 0.05)
    return model


def _parity_worker(rank: int, world: int, store_path: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        for kv_heads in (2, 1):  # grouped-query heads split over the ranks / repeated (1 < 2 ranks)
            _check_parity(rank, world, kv_heads)
        _check_parity(rank, world, 2, documents=True)
    finally:
        dist.destroy_process_group()


def _check_parity(rank: int, world: int, kv_heads: int, documents: bool = False) -> None:
    """documents: windows packed with several documents (`data.packing: documents`), one of them crossing
    the ranks' boundary, one starting right on it, a window holding a single document."""
    from ember.train.context_parallel import ContextParallel

    torch.manual_seed(1)
    inputs = torch.randint(0, 384, (2, SEQ))
    labels = torch.randint(0, 384, (2, SEQ))
    labels[0, :37] = -100  # a prompt: unlabelled tokens
    document_ids = None
    if documents:
        document_ids = torch.zeros(2, SEQ, dtype=torch.long)
        for start in (100, 300, 301, SEQ // 2 + 40):
            document_ids[0, start:] += 1
        document_ids[1, SEQ // 2:] = 1
    model = tiny_llama(kv_heads)
    reference = copy.deepcopy(model)
    expected = reference(inputs, labels=labels, document_ids=document_ids)
    (-expected.sum()).backward()

    cp = ContextParallel(world, rank, world)
    cp.apply(model)
    mine, my_labels, positions = cp.shard(inputs, labels, document_ids)
    if documents:  # positions restart at each document, counted over the whole window
        if rank == 0:
            assert positions[0, 99].item() == 99 and positions[0, 100].item() == 0
        else:  # global 256: 156 tokens into the document that began at 100; row 1's second document
            assert positions[0, 0].item() == 156 and positions[0, 40].item() == 0 and positions[1, 0].item() == 0
    got = model(mine, positions, labels=my_labels)
    (-got.sum()).backward()
    span = slice(rank * SEQ // world, (rank + 1) * SEQ // world)
    torch.testing.assert_close(got, expected[:, span], atol=1e-5, rtol=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)  # replicated parameters: the group's gradient is the sum of its ranks'
        torch.testing.assert_close(grad, q.grad, atol=1e-5, rtol=1e-5, msg=f"{name} (kv_heads {kv_heads})")


def test_ulysses_logprobs_and_grads_match_one_process(tmp_path):
    mp.spawn(_parity_worker, args=(2, str(tmp_path / "store")), nprocs=2)


def long_config(directory, assets, **overrides):
    text = (assets / "train.txt").read_text()
    (directory / "data").mkdir(parents=True, exist_ok=True)
    corpus = directory / "data" / "long.txt"
    corpus.write_text(text * 4)  # a few 4,096-token windows
    return write_config(directory, assets, data={"train": [str(corpus)], "seq_len": 4096},
                        model={"max_position_embeddings": 4096}, micro_batch_size=1, global_batch_size=1,
                        max_steps=3, **overrides)


@pytest.mark.slow
def test_train_4096_tokens_on_two_ranks_matches_one(train_assets, tmp_path):
    one = losses(train(long_config(tmp_path / "one", train_assets), nproc=1))
    records = train(long_config(tmp_path / "cp", train_assets, context_parallel=2), nproc=2)
    two = losses(records)
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step, loss in one.items():
        assert abs(two[step] - loss) <= 1e-5, f"step {step}: {two[step]} vs {loss}"
    assert records[-1]["trained_tokens"] == 4096


def test_context_parallel_config_errors(train_assets, tmp_path):
    from ember.train.trainer import preflight

    with pytest.raises(ConfigError, match="context_parallel"):
        TrainConfig.load(write_config(tmp_path / "zero", train_assets, context_parallel=0))
    config = TrainConfig.load(write_config(tmp_path / "odd", train_assets, context_parallel=2))
    with pytest.raises(ConfigError, match="3 processes do not split into groups of 2"):
        preflight(config, 3)
    config = TrainConfig.load(write_config(tmp_path / "heads", train_assets, context_parallel=3,
                                           data={"seq_len": 33}))
    with pytest.raises(ConfigError, match="4 attention heads do not divide over 3 ranks"):
        preflight(config, 3)
    config = TrainConfig.load(write_config(tmp_path / "seq", train_assets, context_parallel=2,
                                           data={"seq_len": 33}))
    with pytest.raises(ConfigError, match="data.seq_len 33 does not split into 2 slices"):
        preflight(config, 2)


@pytest.fixture(scope="module")
def small_reference(train_assets, tmp_path_factory):
    return train(write_config(tmp_path_factory.mktemp("cp-reference"), train_assets, **SMALL), nproc=1)


SMALL = {"max_steps": 4, "data": {"seq_len": 64, "eval_fraction": 0.1}}


@pytest.mark.slow  # (~30 s each)
@pytest.mark.parametrize("stage, checkpointing", [(1, True), (3, False)])
def test_batches_accumulation_eval_zero_stages_match_one_process(stage, checkpointing, small_reference,
                                                                  train_assets, tmp_path):
    """4 sequences per micro-batch, 2 micro-batches a step, held-out loss, ZeRO-1/3, recomputed blocks."""
    one = small_reference
    two = train(write_config(tmp_path, train_assets, context_parallel=2, zero_stage=stage,
                             activation_checkpointing=checkpointing, **SMALL), nproc=2)
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["trained_tokens"] == b["trained_tokens"], (a, b)
    assert abs(one[-1]["eval_loss"] - two[-1]["eval_loss"]) <= 1e-5


def test_packed_documents_on_two_ranks_match_one_process(train_assets, tmp_path):
    """`data.packing: documents` under context parallel: every window holds several documents (one line
    each), split over 2 ranks; per-step losses equal one process's."""
    import json

    data = tmp_path / "docs.jsonl"
    lines = [line for line in (train_assets / "train.txt").read_text().splitlines() if line.strip()]
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    spec = {"max_steps": 3, "data": {"train": [str(data)], "seq_len": 64, "packing": "documents"}}
    one = losses(train(write_config(tmp_path / "one", train_assets, **spec), nproc=1))
    two = losses(train(write_config(tmp_path / "cp", train_assets, context_parallel=2, **spec), nproc=2))
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step, loss in one.items():
        assert abs(two[step] - loss) <= 1e-5, f"step {step}: {two[step]} vs {loss}"


def test_moe_on_two_ranks_matches_one_process(train_assets, tmp_path):
    """A Mixtral-style model (4 experts, top-2, load-balancing loss 0.02) split over 2 ranks: the routers'
    statistics are averaged over the group, so losses and the reported load-balancing loss equal one
    process's."""
    from tests.train.test_expert_parallel import moe_config

    spec = {"max_steps": 3, "data": {"seq_len": 64}}
    one = train(moe_config(tmp_path / "one", train_assets, **spec), nproc=1)
    two = train(moe_config(tmp_path / "cp", train_assets, context_parallel=2, **spec), nproc=2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["aux_loss"] - b["aux_loss"]) <= 1e-5, (a, b)


@pytest.mark.parametrize("dpo", [{"beta": 0.5}, {"beta": 0.5, "loss_type": "ipo", "reference": "live"}])
def test_dpo_on_two_ranks_matches_one_process(dpo, train_assets, tmp_path):
    """DPO under context parallel: each rank sums its slice of every sequence and the group adds them up;
    the precomputed reference is scored the same way (one rank of the group keeps it), the live one by
    the frozen copy over whole sequences. Losses, rewards and held-out accuracy equal one process's."""
    from tests.train.test_dpo import _dpo_run, _preference_data

    data = _preference_data(tmp_path, 120)
    one = _dpo_run(tmp_path / "one", train_assets, data, max_steps=6, eval_interval=6, dpo=dpo)
    two = _dpo_run(tmp_path / "cp", train_assets, data, max_steps=6, eval_interval=6, dpo=dpo, context_parallel=2,
                   nproc=2)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "reward_margin", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5, (key, a, b)
        if a["step"] > 1:  # (at step 1 policy = reference: every reward is 0 up to rounding, a coin flip)
            assert a["reward_accuracy"] == b["reward_accuracy"]
    assert one[-1]["loss"] < one[0]["loss"]
