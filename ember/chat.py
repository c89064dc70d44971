"""`ember chat`: a terminal chat over the offline engine, with streamed answers.

/reset forgets the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops the answer being
written and keeps the session.
"""

from __future__ import annotations

import argparse
import itertools
import sys


def chat_loop(args: argparse.Namespace, read=input, write=sys.stdout.write) -> int:
    from ember import LLMEngine, SamplingParams
    from ember.cli import engine_kwargs

    engine = LLMEngine.from_args(args.model, **engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    ids = itertools.count()
    write("ember chat: /reset to start over, /exit to leave, Ctrl-C stops an answer\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            write("(conversation cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        prompt = engine.tokenizer.encode_chat(system + history)
        request_id = f"chat-{next(ids)}"
        try:
            engine.add_request(request_id, prompt, params)
        except ValueError as e:  # e.g. the conversation outgrew the context
            history.pop()
            write(f"error: {e}\n")
            continue
        write("ember> ")
        answer = ""
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    piece = output.outputs[0].text[len(answer):]
                    answer = output.outputs[0].text
                    write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            engine.abort_request(request_id)
            engine.step()
            write(" [stopped]")
        write("\n")
        history.append({"role": "assistant", "content": answer})
