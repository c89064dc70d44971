"""`ember` command line: serve | generate | train | bench. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import math
import sys

from ember import __version__


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="an HF-format model directory, a .gguf file, a name from `ember models`, or a Hugging Face "
                        "id (org/name, org/name:Q4_K_M for a GGUF repo; from the HF cache, else downloaded) "
                        "(default: the embedded model)")
    p.add_argument("--revision", default=None, help="the hub revision (branch, tag or commit) of a Hugging Face id")
    p.add_argument("--gguf-file", default=None, help="which .gguf file of a GGUF repo or directory to load")
    p.add_argument("--tokenizer", default=None, help="a model directory or hub id whose tokenizer to use instead")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--policy", default="fcfs", choices=["fcfs", "priority"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative-method", choices=["ngram", "draft"], default=None)
    p.add_argument("--num-speculative-tokens", type=int, default=3)
    p.add_argument("--draft-model", default=None, help="draft model directory (--speculative-method draft)")
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="weight-only quantization at load time (GPTQ/AWQ checkpoints need none)")
    p.add_argument("--quantization-group-size", type=int, default=64, help="int4: input channels per scale")
    p.add_argument("--no-quantize-lm-head", action="store_true", help="keep the LM head in the model's dtype")
    p.add_argument("--no-quantize-embeddings", action="store_true", help="keep the embedding table unquantized")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto")


def speculative(args: argparse.Namespace) -> dict | None:
    if args.speculative_method is None:
        return None
    spec = {"method": args.speculative_method, "num_tokens": args.num_speculative_tokens}
    if args.speculative_method == "ngram":
        spec["max_ngram"] = args.max_ngram
    else:
        spec["model"] = args.draft_model
    return spec


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        revision=args.revision, gguf_file=args.gguf_file, tokenizer=args.tokenizer,
        speculative=speculative(args), dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_gib=args.kv_cache_gib,
        enable_prefix_caching=not args.no_prefix_caching, enable_chunked_prefill=not args.no_chunked_prefill,
        policy=args.policy, seed=args.seed, quantization=args.quantization,
        quantization_group_size=args.quantization_group_size, quantize_lm_head=not args.no_quantize_lm_head,
        quantize_embeddings=not args.no_quantize_embeddings, kv_cache_dtype=args.kv_cache_dtype,
    )


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
    from pathlib import Path

    if args.model_tag is not None:  # `ember serve MODEL`, as vLLM takes it
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"model: given twice ({args.model_tag!r} and --model {args.model!r})")
        args.model = args.model_tag
    chat_template = None
    if args.chat_template:
        path = Path(args.chat_template)
        if not path.is_file():
            raise ValueError(f"--chat-template: {args.chat_template!r} is not a file")
        chat_template = path.read_text()
    sock = listen(args.host, args.port)  # before the model loads: a busy port fails in one line, at once
    # a line at once: loading torch, building kernels and reading weights take a while on a first run
    print(f"ember {__version__}: starting the server for {args.model or 'the default model'} on "
          f"http://{args.host}:{args.port} (loading ...)", file=sys.stderr, flush=True)

    from ember.engine.async_llm import AsyncLLM
    from ember.models.config import ModelConfig
    from ember.registry import resolve_model
    from ember.serve.app import ServerConfig, run_server

    config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key, allowed_origins=tuple(args.allowed_origins or ()),
        max_body_mb=args.max_body_mb, drain_timeout=args.drain_timeout,
    )
    path = resolve_model(args.model, args.revision, args.gguf_file)
    name = args.served_model_name or args.model or "default"
    if ModelConfig.from_path(path).architecture == "BertModel":  # an embedding model: /v1/embeddings
        from ember.engine.embed import EmbeddingEngine

        embedder = EmbeddingEngine(path, dtype=args.dtype, device=args.device)
        return run_server(None, name, config, embedder=embedder, sock=sock)
    llm = AsyncLLM.from_args(path, max_waiting=args.max_waiting, chat_template=chat_template, **engine_kwargs(args))
    return run_server(llm, name, config, sock=sock)


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


TRAIN_USAGE = """usage:
  ember train CONFIG [--nproc N] [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]
  ember train estimate CONFIG [--nproc N]
  ember train export CHECKPOINT OUT_DIR [--dtype float32|bfloat16]
  ember train plot RUN_DIR
  ember train eval MODEL FILE... [--seq-len 256]"""


def cmd_train(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    if not rest or rest[0] in ("-h", "--help"):
        print(TRAIN_USAGE)
        return 0 if rest else 2
    action = rest[0] if rest[0] in ("estimate", "export", "plot", "eval") else "fit"
    p = argparse.ArgumentParser(prog=f"ember train {'' if action == 'fit' else action}".strip())
    if action == "fit":
        p.add_argument("config")
        p.add_argument("--nproc", type=int, default=1, help="processes on this node (torchrun)")
        p.add_argument("--nnodes", type=int, default=1)
        p.add_argument("--node-rank", type=int, default=None)
        p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous for multi-node runs")
        p.add_argument("--rdzv-id", default=None)
        a = p.parse_args(rest)
        from ember.train.launch import launch

        return launch(a.config, a.nproc, a.nnodes, a.node_rank, a.rdzv_endpoint, a.rdzv_id)
    rest = rest[1:]
    if action == "estimate":
        p.add_argument("config")
        p.add_argument("--nproc", type=int, default=1)
        a = p.parse_args(rest)
        from ember.train.config import TrainConfig
        from ember.train.estimate import estimate, report
        from ember.train.trainer import preflight

        config = TrainConfig.load(a.config)
        _, mc = preflight(config, a.nproc)
        print(report(estimate(config, mc.num_params, a.nproc, mc.hidden_size, mc.num_layers, mc.vocab_size),
                     config.zero_stage, config.precision))
        return 0
    if action == "eval":
        p.add_argument("model", help="an HF model directory or a name from `ember models`")
        p.add_argument("data", nargs="+", help="held-out text or JSONL files")
        p.add_argument("--seq-len", type=int, default=256)
        p.add_argument("--text-field", default="text")
        p.add_argument("--quantization", choices=["int8", "int4"], default=None, help="evaluate it quantized")
        p.add_argument("--quantization-group-size", type=int, default=64)
        a = p.parse_args(rest)
        from ember.train.evaluate import heldout_loss

        loss, tokens = heldout_loss(a.model, a.data, a.seq_len, a.text_field, quantization=a.quantization,
                                    group_size=a.quantization_group_size)
        print(f"held-out loss: {loss:.4f} nats/token over {tokens} tokens (perplexity {math.exp(loss):.2f})")
        return 0
    if action == "export":
        p.add_argument("checkpoint")
        p.add_argument("out_dir")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        a = p.parse_args(rest)
        from ember.train.checkpoint import export_checkpoint

        print(f"wrote {export_checkpoint(a.checkpoint, a.out_dir, a.dtype)}")
        return 0
    p.add_argument("run_dir")
    a = p.parse_args(rest)
    from ember.train.plot import plot_run

    for path in plot_run(a.run_dir):
        print(f"wrote {path}")
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    p = argparse.ArgumentParser(prog="ember rl", description="RL post-training with the engine in the loop")
    sub = p.add_subparsers(dest="algo", required=True)
    grpo = sub.add_parser("grpo", help="GRPO on a verifiable toy task (see ember/rl/grpo.py)")
    grpo.add_argument("config")
    grpo.add_argument("--nproc", type=int, default=1)
    a = p.parse_args(args.rest)
    from ember.rl.launch import launch

    return launch(a.config, a.nproc)


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

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


def cmd_bench(args: argparse.Namespace) -> int:
    from ember.bench import cli as bench_cli

    return bench_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="A PyTorch-native LLM stack: serve and train.")
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **k)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    add_engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, default=None)
    gen.add_argument("--stop", action="append")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat in the terminal (streamed; /reset, /exit; Ctrl-C stops an answer)")
    add_engine_args(chat)
    chat.add_argument("--system", default=None, help="a system message to start every conversation")
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.95)
    chat.set_defaults(func=cmd_chat)

    pull = sub.add_parser("pull", help="download a model from the Hugging Face hub into its cache")
    pull.add_argument("model", help="org/name, or org/name:QUANT for one file of a GGUF repo")
    pull.add_argument("--revision", default=None)
    pull.add_argument("--gguf-file", default=None, help="the .gguf file to fetch from a GGUF repo")
    pull.set_defaults(func=cmd_pull)

    models = sub.add_parser("models", help="list ember's models and the Hugging Face cache's")
    models.add_argument("--architectures", action="store_true", help="list the supported HF architectures")
    models.set_defaults(func=cmd_models)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="the model (or give --model)")
    add_engine_args(serve)
    serve.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    serve.add_argument("--chat-template", default=None, help="a jinja file overriding the model's chat template")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--allowed-origins", action="append", help="CORS origin to allow (repeatable, '*' for any)")
    serve.add_argument("--max-body-mb", type=float, default=16.0)
    serve.add_argument("--max-waiting", type=int, default=None, help="429 when this many requests wait")
    serve.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    serve.set_defaults(func=cmd_serve)

    quant = sub.add_parser("quantize", help="write an int8/int4 (GPTQ-format) copy of a model directory")
    quant.add_argument("model_dir", help="an HF model directory or a name from `ember models`")
    quant.add_argument("out_dir")
    quant.add_argument("--method", choices=["int8", "int4"], required=True)
    quant.add_argument("--group-size", type=int, default=64, help="int4: input channels per scale")
    quant.set_defaults(func=cmd_quantize)

    train = sub.add_parser("train", help="ZeRO training: ember train CONFIG | estimate | export | plot",
                           add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=cmd_train)

    from ember.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":  # its options may come before CONFIG: argparse's REMAINDER misses those
        args = argparse.Namespace(func=cmd_train, rest=argv[1:])
    elif argv and argv[0] == "rl":
        args = argparse.Namespace(func=cmd_rl, rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: quietly, with the shell's conventional status
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
