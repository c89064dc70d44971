"""`ember` command line: serve, generate, chat, pull, models, quantize, train, rl and bench.

The engine flags of serve, generate and chat are made from the config dataclasses of
ember/engine/config.py: one flag per field, typed, defaulted and documented by the field, with
vLLM's names accepted too. Each command imports what it needs (torch, the engine) when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import typing
from pathlib import Path

from ember import __version__

# Other names of a field's flag: vLLM's where they differ from ember's, and ember's older
# --no-prefix-caching / --no-chunked-prefill (BooleanOptionalAction derives the --no- forms).
FLAG_ALIASES = {
    "quantization": ("-q",),
    "policy": ("--scheduling-policy",),
    "enable_prefix_caching": ("--prefix-caching",),
    "enable_chunked_prefill": ("--chunked-prefill",),
}
TRAIN_ACTIONS = ("fit", "estimate", "export", "plot", "eval")


class _Parser(argparse.ArgumentParser):
    """Shows defaults in --help; with engine=True, the engine flags too."""

    def __init__(self, *args, engine: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        if engine:
            add_engine_args(self)


# ---- engine flags, from the config dataclasses ---------------------------------------------------
@functools.cache
def engine_fields() -> tuple[tuple[type, dataclasses.Field, type], ...]:
    """(config class, field, value type) for every field of EngineConfig and of the configs nested in it."""
    from ember.engine.config import EngineConfig

    return tuple(_leaf_fields(EngineConfig))



def _leaf_fields(cls: type):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _without_none(hints[f.name])
        if dataclasses.is_dataclass(kind):
            yield from _leaf_fields(kind)
        else:
            yield cls, f, kind


def _without_none(hint):
    """X for Optional[X] (X | None), else the hint itself."""
    args = typing.get_args(hint)
    rest = [a for a in args if a is not type(None)]
    return rest[0] if len(rest) == 1 and len(args) == 2 else hint


def _has_default(f: dataclasses.Field) -> bool:
    # A field without one (the model) is the engine's required argument: the CLI resolves it itself.
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _choices() -> dict[str, tuple[str, ...]]:
    """The fixed sets the engine checks these fields against, offered as argparse choices."""
    from ember.choices import (
        ATTENTION_BACKENDS,
        DTYPE_CHOICES,
        KV_CACHE_DTYPES,
        QUANTIZATION_METHODS,
    )
    from ember.engine.config import POLICIES

    return {"dtype": DTYPE_CHOICES, "attention_backend": ATTENTION_BACKENDS, "policy": POLICIES,
            "kv_cache_dtype": KV_CACHE_DTYPES, "quantization": QUANTIZATION_METHODS}


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e})") from None


def _template_file(path: str) -> str:
    # The config holds the template's text; the flag names the file holding it, as it always has.
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path!r} is not a file")
    return Path(path).read_text()


FIELD_TYPES = {"chat_template": (_template_file, "FILE")}  # (argparse type, metavar) where the annotation's won't do


def _add_field_flag(group, f: dataclasses.Field, kind: type, choices: dict) -> None:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    names = [f"--{f.name.replace('_', '-')}", *FLAG_ALIASES.get(f.name, ())]
    spec = {"dest": f.name, "default": default, "help": f.metadata.get("help", f.name.replace("_", " "))}
    if kind is bool:
        spec["action"] = argparse.BooleanOptionalAction if default else "store_true"
    else:
        spec["type"], spec["metavar"] = FIELD_TYPES.get(f.name) or ((_json, "JSON") if kind is dict else (kind, None))
        spec["choices"] = choices.get(f.name)
    group.add_argument(*names, **spec)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """--model and where to find it, one flag per config field, and the speculative-decoding shorthands."""
    from ember.engine.config import EngineConfig

    groups = {EngineConfig: p.add_argument_group("EngineConfig")}  # one group per config class, as vLLM's
    _add_model_location_args(groups[EngineConfig])
    choices = _choices()
    for cls, f, kind in engine_fields():
        if cls not in groups:
            groups[cls] = p.add_argument_group(cls.__name__)
        if _has_default(f):
            _add_field_flag(groups[cls], f, kind, choices)
    _add_speculative_shorthands(p)


def _add_model_location_args(g) -> None:
    g.add_argument("--model", default=None,
                   help="an HF-format model directory, a .gguf file, a name from `ember models`, or a Hugging Face "
                        "id (org/name, org/name:Q4_K_M for a GGUF repo; from the HF cache, else downloaded); "
                        "none: the embedded model")
    g.add_argument("--revision", default=None, help="the hub revision (branch, tag or commit) of a Hugging Face id")
    g.add_argument("--gguf-file", default=None, help="which .gguf file of a GGUF repo or directory to load")


def _add_speculative_shorthands(p: argparse.ArgumentParser) -> None:
    from ember.choices import SPECULATIVE_METHODS as METHODS
    from ember.engine.config import SpeculativeConfig

    defaults = SpeculativeConfig()
    g = p.add_argument_group("speculative decoding", "shorthands for --speculative")
    g.add_argument("--speculative-method", choices=METHODS, default=None, help="how drafts are proposed")
    g.add_argument("--num-speculative-tokens", type=int, default=defaults.num_tokens, help="drafts per step")
    g.add_argument("--draft-model", default=None, help="draft model directory (--speculative-method draft)")
    g.add_argument("--max-ngram", type=int, default=defaults.max_ngram,
                   help="longest n-gram looked up (--speculative-method ngram)")


def _speculative(args: argparse.Namespace) -> dict | None:
    if args.speculative_method is None:
        return args.speculative
    if args.speculative is not None:
        raise ValueError("speculative: give --speculative or --speculative-method, not both")
    spec = {"method": args.speculative_method, "num_tokens": args.num_speculative_tokens}
    if args.speculative_method == "ngram":
        spec["max_ngram"] = args.max_ngram
    else:
        spec["model"] = args.draft_model
    return spec


def config_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig.from_kwargs's keyword arguments (all but the model) from the parsed engine flags;
    the config validates them."""
    kwargs = {f.name: getattr(args, f.name) for _, f, _ in engine_fields() if _has_default(f)}
    kwargs["speculative"] = _speculative(args)
    return kwargs


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLMEngine.from_args's keyword arguments: where to find the model, and the config's."""
    return {"revision": args.revision, "gguf_file": args.gguf_file, **config_kwargs(args)}


# ---- commands ----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from ember import LLMEngine, SamplingParams

    engine = LLMEngine.from_args(args.model, **engine_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.sample_seed, stop=args.stop or None,
    )
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    engine.add_request("cli", prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ember.registry import list_models, models_folder

    if args.architectures:
        from ember.models import ARCHITECTURES

        print("\n".join(sorted(ARCHITECTURES)))
        return 0
    from ember import hub

    found = list_models()
    print(f"ember's models ({models_folder()}):")
    for name, path in found.items():
        print(f"  {name:<40} {path}")
    if not found:
        print(f"  none (add HF directories or .gguf files under {models_folder()})")
    cached = hub.cached_models()
    print(f"Hugging Face cache ({hub.cache_dir()}):")
    for m in cached:
        print(f"  {m.repo:<40} {m.size_bytes / (1 << 20):>9.1f} MiB  {m.format}")
    if not cached:
        print("  none (`ember pull org/name` downloads one)")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from ember import hub

    ref = hub.RepoRef.parse(args.model, args.revision, args.gguf_file)
    if not hub.looks_like_repo_id(ref.repo):
        raise ValueError(f"model: {args.model!r} is not a Hugging Face id (org/name)")
    if hub.offline():
        raise ValueError("ember pull: HF_HUB_OFFLINE is set; unset it to download")
    print(hub.download(ref))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ember.chat import chat_loop

    return chat_loop(args)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.model_tag is not None:  # `ember serve MODEL`, as vLLM takes it
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"model: given twice ({args.model_tag!r} and --model {args.model!r})")
        args.model = args.model_tag
    if args.data_parallel_size < 1:
        raise ValueError(f"data_parallel_size: {args.data_parallel_size} must be >= 1")
    sock = listen(args.host, args.port)  # before the model loads: a busy port fails in one line, at once
    if args.data_parallel_size > 1:
        from ember.serve.data_parallel import serve_data_parallel

        print(f"ember {__version__}: starting {args.data_parallel_size} replicas of {args.model or 'the default model'} "
              f"behind a router on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        return serve_data_parallel(args.argv, args.data_parallel_size, sock, args.host, args.port,
                                   args.router_policy, args.distributed_executor)
    # a line at once: building kernels and reading weights take a while on a first run
    print(f"ember {__version__}: starting the server for {args.model or 'the default model'} on "
          f"http://{args.host}:{args.port} (loading ...)", file=sys.stderr, flush=True)

    from ember.engine.async_llm import AsyncLLM
    from ember.models.config import ModelConfig
    from ember.registry import resolve_model
    from ember.serve.app import ServerConfig, run_server

    config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key, allowed_origins=tuple(args.allowed_origins or ()),
        max_body_mb=args.max_body_mb, drain_timeout=args.drain_timeout,
        allow_runtime_lora_updating=args.allow_runtime_lora_updating,
    )
    path = resolve_model(args.model, args.revision, args.gguf_file)
    name = args.served_model_name or args.model or "default"
    if ModelConfig.from_path(path).architecture == "BertModel":  # an embedding model: /v1/embeddings
        from ember.engine.embed import EmbeddingEngine

        embedder = EmbeddingEngine(path, dtype=args.dtype, device=args.device)
        return run_server(None, name, config, embedder=embedder, sock=sock)
    llm = AsyncLLM.from_args(path, max_waiting=args.max_waiting, **engine_kwargs(args))
    return run_server(llm, name, config, sock=sock, lora_modules=lora_modules(args.lora_modules))


def cmd_router(args: argparse.Namespace) -> int:
    from ember.serve.router import RouterConfig, run_router

    config = RouterConfig(tuple(args.backend), policy=args.policy, balance_threshold=args.balance_threshold)
    return run_router(config, args.host, args.port, listen(args.host, args.port))


def lora_modules(specs: list[str] | None) -> dict[str, str]:
    """--lora-modules NAME=PATH ... (or vLLM's JSON form {"name": ..., "path": ...}) -> {name: path}."""
    modules: dict[str, str] = {}
    for spec in specs or ():
        if spec.lstrip().startswith("{"):
            try:
                item = json.loads(spec)
                name, path = item["name"], item["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"lora_modules: {spec!r} is not {{\"name\": ..., \"path\": ...}}") from None
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules: {spec!r} is not NAME=PATH")
        modules[name] = path
    return modules


def listen(host: str, port: int):
    """A listening socket on host:port, or one clear error when the port is taken."""
    import errno
    import socket

    if not 0 < port < 65536:
        raise ValueError(f"port: {port} is not a TCP port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port: {port} on {host} is already in use; pick another with --port") from None
        raise ValueError(f"host: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def cmd_quantize(args: argparse.Namespace) -> int:
    from ember.models import load_model
    from ember.models.quant import QuantConfig
    from ember.models.quant_formats import save_quantized
    from ember.registry import resolve_model

    model_dir = Path(resolve_model(args.model_dir))
    config = QuantConfig(args.method, args.group_size)
    model, _ = load_model(model_dir, dtype="float32")
    save_quantized(model, model_dir, Path(args.out_dir), config)
    print(f"wrote {args.method} GPTQ checkpoint to {args.out_dir}")
    return 0


def cmd_train_fit(args: argparse.Namespace) -> int:
    from ember.train.launch import launch

    return launch(args.config, args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id,
                  args.max_restarts)


def cmd_train_estimate(args: argparse.Namespace) -> int:
    from ember.train.config import TrainConfig
    from ember.train.estimate import estimate, lora_counts, report
    from ember.train.trainer import preflight

    config = TrainConfig.load(args.config)
    _, mc = preflight(config, args.nproc)
    lora = lora_counts(mc, config.lora) if config.lora is not None else None
    if lora is not None:
        print(f"LoRA r={config.lora.r}: {lora.trainable:,} trainable parameters; base "
              f"{config.lora.base_quantization or 'float32'} (frozen)")
    print(report(estimate(config, mc, args.nproc, lora), config.zero_stage, config.precision))
    return 0


def cmd_train_eval(args: argparse.Namespace) -> int:
    from ember.train.evaluate import heldout_loss

    loss, tokens = heldout_loss(args.model, args.data, args.seq_len, args.text_field, quantization=args.quantization,
                                group_size=args.quantization_group_size)
    print(f"held-out loss: {loss:.4f} nats/token over {tokens} tokens (perplexity {math.exp(loss):.2f})")
    return 0


def cmd_train_export(args: argparse.Namespace) -> int:
    from ember.train.checkpoint import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, args.out_dir, args.dtype, merge=args.merge)}")
    return 0


def cmd_train_plot(args: argparse.Namespace) -> int:
    from ember.train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(f"wrote {path}")
    return 0


def cmd_rl_grpo(args: argparse.Namespace) -> int:
    from ember.rl.launch import launch

    return launch(args.config, args.nproc)


def cmd_bench(args: argparse.Namespace) -> int:
    from ember.bench import cli as bench_cli

    return bench_cli.run(args)


# ---- the parser --------------------------------------------------------------------------------
def _add_generate_and_chat(sub) -> None:
    gen = sub.add_parser("generate", engine=True, help="generate text for one prompt, streamed to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass")
    gen.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    gen.add_argument("--sample-seed", type=int, default=None, help="this request's sampling seed")
    gen.add_argument("--stop", action="append", help="a string that ends the output (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", engine=True,
                          help="chat in the terminal (streamed; /reset, /exit; Ctrl-C stops an answer)")
    chat.add_argument("--system", default=None, help="a system message to start every conversation")
    chat.add_argument("--max-tokens", type=int, default=512, help="tokens per answer at most")
    chat.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    chat.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling's probability mass")
    chat.set_defaults(func=cmd_chat)


def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", engine=True, help="OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="the model (or give --model)")
    serve.add_argument("--served-model-name", default=None, help="the model id clients use (none: the model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--allowed-origins", action="append", help="CORS origin to allow (repeatable, '*' for any)")
    serve.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body accepted, in MiB")
    serve.add_argument("--max-waiting", type=int, default=None, help="429 when this many requests wait")
    serve.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    serve.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                       help="LoRA adapters (PEFT directories) clients select by name in \"model\" (needs --enable-lora)")
    serve.add_argument("--allow-runtime-lora-updating", action="store_true",
                       default=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
                       help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read paths the "
                            "client names; also set by VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)")
    serve.add_argument("--data-parallel-size", type=int, default=1,
                       help="N engine replicas (processes, the cores split between them) behind one endpoint, "
                            "requests routed by cached prefix and queue depth (ember router)")
    serve.add_argument("--router-policy", choices=["prefix", "round_robin"], default="prefix",
                       help="--data-parallel-size: how the router places requests")
    serve.set_defaults(func=cmd_serve)

    router = sub.add_parser("router", help="one OpenAI endpoint over several `ember serve` replicas, placing "
                                           "each request by cached prefix and queue depth")
    router.add_argument("--backend", action="append", required=True, metavar="URL",
                        help="a replica's base URL, e.g. http://10.0.0.2:8000 (repeatable)")
    router.add_argument("--host", default="127.0.0.1", help="address to listen on")
    router.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    router.add_argument("--policy", choices=["prefix", "round_robin"], default="prefix")
    router.add_argument("--balance-threshold", type=int, default=8,
                        help="in-flight requests a cached prefix may outweigh before the least busy replica wins")
    router.set_defaults(func=cmd_router)


def _add_model_commands(sub) -> None:
    pull = sub.add_parser("pull", help="download a model from the Hugging Face hub into its cache")
    pull.add_argument("model", help="org/name, or org/name:QUANT for one file of a GGUF repo")
    pull.add_argument("--revision", default=None, help="the branch, tag or commit to fetch")
    pull.add_argument("--gguf-file", default=None, help="the .gguf file to fetch from a GGUF repo")
    pull.set_defaults(func=cmd_pull)

    models = sub.add_parser("models", help="list ember's models and the Hugging Face cache's")
    models.add_argument("--architectures", action="store_true", help="list the supported HF architectures")
    models.set_defaults(func=cmd_models)

    quant = sub.add_parser("quantize", help="write an int8/int4 (GPTQ-format) copy of a model directory")
    quant.add_argument("model_dir", help="an HF model directory or a name from `ember models`")
    quant.add_argument("out_dir")
    quant.add_argument("--method", choices=["int8", "int4"], required=True)
    quant.add_argument("--group-size", type=int, default=64, help="int4: input channels per scale")
    quant.set_defaults(func=cmd_quantize)


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="ZeRO training: ember train [fit] CONFIG | estimate | export | plot | eval",
                           description="ZeRO training. `ember train CONFIG ...` is short for "
                                       "`ember train fit CONFIG ...`.")
    actions = train.add_subparsers(dest="action", metavar="ACTION", required=True)
    fit = actions.add_parser("fit", help="train from a YAML config: in place, or --nproc processes under torchrun")
    fit.add_argument("config")
    fit.add_argument("--nproc", type=int, default=1, help="processes on this node (torchrun)")
    fit.add_argument("--nnodes", type=int, default=1, help="nodes of a multi-node run")
    fit.add_argument("--node-rank", type=int, default=None, help="this node's rank in a multi-node run")
    fit.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous for multi-node runs")
    fit.add_argument("--rdzv-id", default=None, help="the rendezvous id (none: a random one)")
    fit.add_argument("--max-restarts", type=int, default=0,
                     help="restart all workers up to this many times after one dies; they resume from the "
                          "latest checkpoint (torchrun's elastic restarts)")
    fit.set_defaults(func=cmd_train_fit)

    est = actions.add_parser("estimate", help="per-rank memory of a config: ZeRO's formulas and ember's own")
    est.add_argument("config")
    est.add_argument("--nproc", type=int, default=1, help="processes to spread the model states over")
    est.set_defaults(func=cmd_train_estimate)

    export = actions.add_parser("export", help="a checkpoint as an HF model directory")
    export.add_argument("checkpoint")
    export.add_argument("out_dir")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export.add_argument("--merge", action="store_true",
                        help="a LoRA run: the base model with the adapter merged in (default: the PEFT adapter)")
    export.set_defaults(func=cmd_train_export)

    plot = actions.add_parser("plot", help="loss.png and throughput.png of a run, from its metrics.jsonl")
    plot.add_argument("run_dir")
    plot.set_defaults(func=cmd_train_plot)

    ev = actions.add_parser("eval", help="held-out loss and perplexity of a model on text or JSONL files")
    ev.add_argument("model", help="an HF model directory or a name from `ember models`")
    ev.add_argument("data", nargs="+", help="held-out text or JSONL files")
    ev.add_argument("--seq-len", type=int, default=256, help="tokens per evaluated window")
    ev.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    ev.add_argument("--quantization", choices=["int8", "int4"], default=None, help="evaluate it quantized")
    ev.add_argument("--quantization-group-size", type=int, default=64, help="int4: input channels per scale")
    ev.set_defaults(func=cmd_train_eval)


def _add_rl(sub) -> None:
    rl = sub.add_parser("rl", help="RL post-training with the engine in the loop",
                        description="RL post-training with the engine in the loop")
    algos = rl.add_subparsers(dest="algo", metavar="ALGORITHM", required=True)
    grpo = algos.add_parser("grpo", help="GRPO on a verifiable toy task (see ember/rl/grpo.py)")
    grpo.add_argument("config")
    grpo.add_argument("--nproc", type=int, default=1, help="processes (torchrun when > 1)")
    grpo.set_defaults(func=cmd_rl_grpo)


def build_parser() -> argparse.ArgumentParser:
    from ember.bench.cli import add_bench_parser

    parser = _Parser(prog="ember", description="A PyTorch-native LLM stack: serve and train.")
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate_and_chat(sub)
    _add_model_commands(sub)
    _add_serve(sub)
    _add_train(sub)
    _add_rl(sub)
    add_bench_parser(sub)
    return parser


def _default_train_action(argv: list[str]) -> list[str]:
    """`ember train CONFIG ...` (options may come first) means `ember train fit CONFIG ...`:
    argparse has no default subcommand."""
    if len(argv) > 1 and argv[0] == "train" and argv[1] not in (*TRAIN_ACTIONS, "-h", "--help"):
        return ["train", "fit", *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    from ember._optional import MissingDependency
    from ember.logs import configure_logging

    configure_logging()  # a program shows its INFO lines; `import ember` alone configures nothing
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_default_train_action(argv))
    args.argv = argv  # as given: `serve --data-parallel-size` starts its replicas with the same arguments
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MissingDependency as e:  # an optional extra this command needs
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: quietly, with the shell's conventional status
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
