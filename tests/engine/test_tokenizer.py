"""Tokenizer files, chat templates, incremental detokenization and stop strings."""

import json

import pytest

from ember import LLM, SamplingParams
from ember.engine.output import find_stop_string
from ember.tokenizer import IncrementalDetokenizer, Tokenizer


def test_special_tokens_and_chat_template(llama_dir):
    tok = Tokenizer(llama_dir)
    assert tok.eos_token_ids == [tok.hf.token_to_id("<|im_end|>"), tok.hf.token_to_id("<|endoftext|>")]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.hf.token_to_id("<|im_start|>")


def test_chat_template_matches_transformers(llama_dir):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(llama_dir)
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "café?"}]
    ours = Tokenizer(llama_dir)
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode("Hello world, café") == hf.encode("Hello world, café")


def test_chat_template_file_and_errors(tmp_path, llama_dir):
    tok = Tokenizer(llama_dir, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(ValueError, match="no system role"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="invalid jinja"):
        Tokenizer(llama_dir, chat_template="{% for %}").apply_chat_template([])
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def test_incremental_detokenizer_never_splits_characters(llama_dir):
    tok = Tokenizer(llama_dir)
    text = "Unicode: café, 東京, Москва, emoji 🙂 and ☕. Done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.step(i) for i in ids]
    assert "".join(pieces) == text
    for piece in pieces:
        assert "\ufffd" not in piece
    # byte-level BPE splits multi-byte characters: some steps must have waited
    assert sum(1 for p in pieces if p == "") > 0


def test_stop_string_found_across_token_boundaries():
    text = "hello wor"
    assert find_stop_string(text, 3, ["world"], False) is None
    text += "ld and more"
    assert find_stop_string(text, 11, ["world", "and"], False) == ("hello ", "world")
    assert find_stop_string(text, 11, ["world"], True) == ("hello world", "world")


def test_engine_stops_on_strings_spanning_tokens(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32")
    free = llm.generate(["The"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    text = free.text
    assert len(text) > 12
    stop = text[5:9]  # very likely spans a token boundary; wherever it is, the output ends before it
    out = llm.generate(["The"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    out = llm.generate(["The"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop) + len(stop)]
    # stop token ids: the token is kept in token_ids, its text is not
    token = free.token_ids[3]
    out = llm.generate(["The"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[token]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(token) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == token


def test_generation_config_eos(tmp_path, llama_dir):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer(d).eos_token_ids[0] == 7
