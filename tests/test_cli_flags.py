"""The CLI's engine flags come from the config dataclasses: every field has one, vLLM's names parse to the
same config, no flags give the dataclasses' defaults; `train` and `rl` are argparse subcommands."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

from ember import cli
from ember.cli import build_parser, config_kwargs, engine_kwargs
from ember.engine.config import CacheConfig, EngineConfig, SchedulerConfig

# `ember serve --help` before the flags were generated: every one of them still parses.
OLD_ENGINE_FLAGS = [
    "--model", "--revision", "--gguf-file", "--tokenizer", "--dtype", "--device", "--max-model-len", "--max-num-seqs",
    "--max-num-batched-tokens", "--kv-cache-gib", "--no-prefix-caching", "--no-chunked-prefill", "--policy", "--seed",
    "--speculative-method", "--num-speculative-tokens", "--draft-model", "--max-ngram", "--quantization",
    "--quantization-group-size", "--no-quantize-lm-head", "--no-quantize-embeddings", "--kv-cache-dtype",
]
OLD_SERVE_FLAGS = ["--served-model-name", "--chat-template", "--host", "--port", "--api-key", "--allowed-origins",
                   "--max-body-mb", "--max-waiting", "--drain-timeout"]


def config(*flags: str, command: tuple[str, ...] = ("serve",)) -> EngineConfig:
    return EngineConfig.from_kwargs("m", **config_kwargs(build_parser().parse_args([*command, *flags])))


def help_text(capsys, *command: str) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("cls", [EngineConfig, CacheConfig, SchedulerConfig])
def test_every_config_field_has_a_flag_with_help(cls, capsys):
    text = help_text(capsys, "serve")
    args = build_parser().parse_args(["serve"])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue  # a nested config: its own fields are checked
        assert f"--{f.name.replace('_', '-')}" in text and hasattr(args, f.name), f.name
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


@pytest.mark.parametrize("command", [("serve",), ("chat",), ("generate", "a prompt")])
def test_no_flags_give_the_dataclass_defaults(command):
    args = build_parser().parse_args(list(command))
    assert EngineConfig.from_kwargs("m", **config_kwargs(args)) == EngineConfig(model="m")
    assert (args.model, args.revision, args.gguf_file) == (None, None, None)


@pytest.mark.parametrize("ember_flags,vllm_flags", [
    (["--no-prefix-caching"], ["--no-enable-prefix-caching"]),
    (["--no-chunked-prefill"], ["--no-enable-chunked-prefill"]),
    (["--quantization", "int8"], ["-q", "int8"]),
    (["--policy", "priority"], ["--scheduling-policy", "priority"]),
])
def test_vllm_names_give_the_same_config(ember_flags, vllm_flags):
    assert config(*vllm_flags) == config(*ember_flags) != config()


def test_a_vllm_command_line_parses_to_its_values():
    c = config("--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--block-size",
               "32", "--kv-cache-dtype", "int8", "--dtype", "bfloat16", "--seed", "7", "--tokenizer", "tok",
               "--enable-prefix-caching", "--enable-chunked-prefill", "--quantization", "int4")
    assert (c.scheduler.max_model_len, c.scheduler.max_num_seqs, c.scheduler.max_num_batched_tokens) == (512, 8, 256)
    assert (c.cache.block_size, c.cache.kv_cache_dtype, c.cache.enable_prefix_caching) == (32, "int8", True)
    assert (c.dtype, c.seed, c.tokenizer, c.quantization) == ("bfloat16", 7, "tok", "int4")
    args = build_parser().parse_args(["serve", "org/name", "--revision", "main", "--served-model-name", "x"])
    assert (args.model_tag, engine_kwargs(args)["revision"], args.served_model_name) == ("org/name", "main", "x")


def test_old_flags_still_parse_to_the_same_config(capsys):
    text = help_text(capsys, "serve")
    assert all(flag in text for flag in OLD_ENGINE_FLAGS + OLD_SERVE_FLAGS)
    c = config("--no-quantize-lm-head", "--no-quantize-embeddings", "--kv-cache-gib", "1.5", "--device", "cpu",
               "--quantization", "int4", "--quantization-group-size", "32", "--max-model-len", "100")
    assert (c.quantize_lm_head, c.quantize_embeddings, c.quantization_group_size) == (False, False, 32)
    assert (c.cache.kv_cache_gib, c.device, c.scheduler.max_model_len) == (1.5, "cpu", 100)
    assert not config("--no-prefix-caching").cache.enable_prefix_caching
    assert not config("--no-chunked-prefill").scheduler.enable_chunked_prefill


def test_attention_backend_and_help_defaults(capsys):
    text = help_text(capsys, "generate")
    assert "--attention-backend {auto," in text
    assert "(default: 2048)" in text and "(default: fcfs)" in text
    assert config("--attention-backend", "torch_paged", command=("chat",)).attention_backend == "torch_paged"
    with pytest.raises(SystemExit):
        config("--attention-backend", "flash")


def test_speculative_json_and_shorthands_agree():
    ngram = {"method": "ngram", "num_tokens": 4, "max_ngram": 2}
    assert config("--speculative", json.dumps(ngram)).speculative == ngram
    shorthand = config("--speculative-method", "ngram", "--num-speculative-tokens", "4", "--max-ngram", "2")
    assert shorthand.speculative == ngram
    draft = config("--speculative-method", "draft", "--draft-model", "d").speculative
    assert draft == {"method": "draft", "num_tokens": 3, "model": "d"}
    with pytest.raises(ValueError, match="not both"):
        config("--speculative", json.dumps(ngram), "--speculative-method", "ngram")


def test_chat_template_flag_reads_the_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    assert config("--chat-template", str(path), command=("generate", "hi")).chat_template == "{{ messages }}"
    with pytest.raises(SystemExit):
        config("--chat-template", str(tmp_path / "missing"))


def test_values_are_validated_by_the_config_once(capsys):
    with pytest.raises(ValueError, match="block_size"):
        config("--block-size", "7")
    assert cli.main(["generate", "hi", "--max-num-seqs", "0"]) == 2  # the config refuses it before any loading
    assert "max_num_seqs" in capsys.readouterr().err


def test_a_new_config_field_gets_a_flag_with_no_other_edit(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Extra:
        swap_gib: float | None = dataclasses.field(default=None, metadata={"help": "CPU swap space"})
        offload: bool = dataclasses.field(default=False, metadata={"help": "offload weights"})

    fields = (*cli.engine_fields(), *cli._leaf_fields(Extra))
    monkeypatch.setattr(cli, "engine_fields", lambda: fields)
    args = build_parser().parse_args(["serve", "--swap-gib", "2", "--offload"])
    kwargs = config_kwargs(args)
    assert (kwargs["swap_gib"], kwargs["offload"]) == (2.0, True)
    assert config_kwargs(build_parser().parse_args(["serve"]))["offload"] is False


@pytest.mark.parametrize("argv,command,expected", [
    (["train", "cfg.yaml"], "cmd_train_fit", {"config": "cfg.yaml", "nproc": 1, "nnodes": 1, "max_restarts": 0}),
    (["train", "--nproc", "2", "cfg.yaml"], "cmd_train_fit", {"config": "cfg.yaml", "nproc": 2}),
    (["train", "--nproc", "2", "--max-restarts", "3", "cfg.yaml"], "cmd_train_fit", {"nproc": 2, "max_restarts": 3}),
    (["train", "--nproc", "8", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "h:29500", "c.yaml"],
     "cmd_train_fit", {"nnodes": 2, "node_rank": 0, "rdzv_endpoint": "h:29500", "rdzv_id": None}),
    (["train", "fit", "cfg.yaml"], "cmd_train_fit", {"config": "cfg.yaml"}),
    (["train", "estimate", "cfg.yaml", "--nproc", "8"], "cmd_train_estimate", {"config": "cfg.yaml", "nproc": 8}),
    (["train", "export", "ck", "out", "--dtype", "bfloat16"], "cmd_train_export",
     {"checkpoint": "ck", "out_dir": "out", "dtype": "bfloat16"}),
    (["train", "plot", "runs/x"], "cmd_train_plot", {"run_dir": "runs/x"}),
    (["train", "eval", "m", "a.jsonl", "b.txt", "--seq-len", "128", "--quantization", "int8"], "cmd_train_eval",
     {"model": "m", "data": ["a.jsonl", "b.txt"], "seq_len": 128, "text_field": "text", "quantization": "int8",
      "quantization_group_size": 64}),
    (["rl", "grpo", "--nproc", "2", "g.yaml"], "cmd_rl_grpo", {"config": "g.yaml", "nproc": 2}),
])
def test_train_and_rl_subcommands(monkeypatch, argv, command, expected):
    seen = {}
    monkeypatch.setattr(cli, command, lambda args: seen.update(vars(args)) or 0)
    assert cli.main(argv) == 0
    assert {k: seen[k] for k in expected} == expected


@pytest.mark.parametrize("argv", [["train"], ["rl"], ["train", "estimate"], ["rl", "ppo", "x"]])
def test_train_and_rl_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_commands_without_an_engine_do_not_load_torch():
    code = ("import sys; from ember.cli import build_parser; p = build_parser(); "
            "p.parse_args(['train', 'fit', 'c.yaml']); p.parse_args(['pull', 'org/name']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
