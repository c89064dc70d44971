"""`ember` command line: serve | generate | bench. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import sys


def add_engine_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="HF-format model directory")
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


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_gib=args.kv_cache_gib,
        enable_prefix_caching=not args.no_prefix_caching, enable_chunked_prefill=not args.no_chunked_prefill,
        policy=args.policy, seed=args.seed,
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


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.model is None:
        raise ValueError("--model: required (give an HF-format model directory)")
    from ember.engine.async_llm import AsyncLLM
    from ember.serve.app import ServerConfig, run_server

    config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key, allowed_origins=tuple(args.allowed_origins or ()),
        max_body_mb=args.max_body_mb, drain_timeout=args.drain_timeout,
    )
    chat_template = None
    if args.chat_template:
        path = Path(args.chat_template)
        if not path.is_file():
            raise ValueError(f"--chat-template: {args.chat_template!r} is not a file")
        chat_template = path.read_text()
    llm = AsyncLLM.from_args(args.model, max_waiting=args.max_waiting, chat_template=chat_template,
                             **engine_kwargs(args))
    run_server(llm, args.served_model_name or args.model, config)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ember.bench import cli as bench_cli

    return bench_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="A PyTorch-native LLM stack: serve and train.")
    sub = parser.add_subparsers(dest="command", required=True)

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

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(serve, model_required=False)
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

    from ember.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
