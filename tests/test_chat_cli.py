"""`ember chat` driven with scripted input: streamed answers, history, /reset, /exit, Ctrl-C."""

import argparse

from ember.chat import chat_loop
from ember.cli import build_parser


def run_chat(model, lines, interrupt_after=None):
    args = build_parser().parse_args(["chat", "--model", str(model), "--dtype", "float32", "--max-tokens", "12"])
    written = []
    feed = iter(lines)
    interrupted = []

    def read(prompt):
        written.append(prompt)
        return next(feed)

    def write(text):
        written.append(text)
        if interrupt_after is not None and not interrupted and "ember> " in written and len(written) > interrupt_after:
            interrupted.append(True)
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the answer streams

    code = chat_loop(args, read=read, write=write)
    return code, "".join(written)


def test_chat_turns_reset_and_exit(llama_dir):
    code, transcript = run_chat(llama_dir, ["Hello there", "and again", "/reset", "one more", "/exit"])
    assert code == 0
    assert transcript.count("ember> ") == 3
    assert "(conversation cleared)" in transcript


def test_ctrl_c_stops_the_answer_not_the_session(llama_dir):
    code, transcript = run_chat(llama_dir, ["Tell me a long story", "/exit"], interrupt_after=6)
    assert code == 0 and "[stopped]" in transcript
    assert isinstance(build_parser(), argparse.ArgumentParser)
