"""Tensor parallel on CPU (gloo over loopback, one worker process per extra rank) against one process:
fp32 greedy tokens identical, bf16 within vLLM's logprob rule, the same through `ember serve`, and a
worker that dies ends the engine (and the server) with an error naming it, never a hang."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.tensor_parallel import WorkerDiedError
from tests.conftest import children_of
from tests.engine.test_kv_int8 import check_logprobs_close

PROMPTS = [[1 + (i * 37 + j * 11) % 500 for j in range(5 + 9 * i)] for i in range(8)]  # 5 to 68 tokens


def SLOW(*values):  # noqa: N802 (reads as a mark in a parameter list)
    """A parameter set run with the slow tests only (the default suite keeps one of each kind)."""
    return pytest.param(*values, marks=pytest.mark.slow)


def generate(path, tp: int, dtype: str = "float32", **kwargs):
    llm = LLM(str(path), dtype=dtype, tensor_parallel_size=tp, **kwargs)
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
        return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("arch,overrides", [("llama", {}), SLOW("qwen2", {}), SLOW("mixtral", {}), ("qwen2_moe", {}),
                                            SLOW("qwen2", {"num_key_value_heads": 1}),
                                            ("phi3", {"num_key_value_heads": 1}), ("olmo2", {}), ("gpt_oss", {})])
def test_tp2_fp32_greedy_tokens_equal_one_process(model_factory, arch, overrides):
    # qwen2: tied embeddings (the vocabulary-parallel head is the embedding's shard) and q/k/v biases;
    # mixtral and qwen2_moe: experts split by channel, the latter with a shared expert; one KV head: both
    # ranks hold it (replicated), each with half the query heads; olmo2: q and k normalised over every head
    # (the ranks' sums of squares all-reduced); gpt_oss: sinks by head, interleaved gate|up experts with biases
    path = model_factory(arch, std=0.2, **overrides)
    one, two = generate(path, 1), generate(path, 2)
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]
    for a, b in zip(one, two):  # and the logprobs, to fp32 summation-order noise
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys()
            assert max(abs(x[t].logprob - y[t].logprob) for t in x) < 1e-4


def test_tp2_bf16_within_logprob_rule(model_factory):
    path = model_factory("llama", std=0.2)
    one, two = generate(path, 1, "bfloat16"), generate(path, 2, "bfloat16")
    assert check_logprobs_close(two, one) >= 0.5


def test_vocabulary_split_unevenly_pads_and_cuts(model_factory):
    # 509 rows over 2 ranks: rank 1's slice has one padded row, which must never be sampled
    path = model_factory("llama", std=0.2, vocab_size=509)
    one, two = generate(path, 1), generate(path, 2)
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]


def test_sizes_that_do_not_divide_are_refused_before_any_process_starts(model_factory):
    path = model_factory("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 4 does not divide the model's num_attention_heads"):
        LLM(str(path), tensor_parallel_size=4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 3 neither divides the model's num_key_value_heads \(2\)"):
        LLM(str(path), tensor_parallel_size=3)
    olmo = model_factory("olmo2", num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"normalises k over all its KV heads"):
        LLM(str(olmo), tensor_parallel_size=2)


def prompt_logprobs(path, tp: int, dtype: str = "bfloat16", **kwargs) -> torch.Tensor:
    """The log-probability of each prompt token after the first, teacher-forced, over PROMPTS."""
    llm = LLM(str(path), dtype=dtype, tensor_parallel_size=tp, **kwargs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    finally:
        llm.engine.shutdown()
    return torch.tensor([o.prompt_logprobs[i][t].logprob for o in outs
                         for i, t in enumerate(o.prompt_token_ids) if i > 0])


@pytest.mark.parametrize("method", ["int8", SLOW("int4")])
def test_load_time_quantization_splits_then_quantizes(model_factory, method):
    # Each rank quantizes its own pieces: column-parallel rows keep their scales, row-parallel ones get
    # per-rank scales over their half of the input. Split and quantized, the model is no further from the
    # unquantized one than quantized in one process (teacher-forced prompt logprobs).
    path = model_factory("llama", std=0.2, hidden_size=128, intermediate_size=256)
    exact = prompt_logprobs(path, 1)
    quant = {"quantization": method, "quantization_group_size": 32}
    one = (prompt_logprobs(path, 1, **quant) - exact).abs().mean()
    two = (prompt_logprobs(path, 2, **quant) - exact).abs().mean()
    assert 0 < two <= 1.25 * one, (one, two)


def test_a_killed_worker_ends_the_engine_with_its_name(model_factory):
    path = model_factory("llama", std=0.2)
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=2)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    try:
        assert len(llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids) == 8
        worker = llm.engine.tp_workers.links[0].process
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        with pytest.raises(WorkerDiedError, match=r"tensor-parallel worker 1 exited \(code -9\)"):
            llm.generate([[1, 2, 3]], params, use_tqdm=False)
        with pytest.raises(WorkerDiedError):  # and stays over
            llm.generate([[4, 5, 6]], params, use_tqdm=False)
    finally:
        llm.engine.shutdown()


def _spawned_workers(pid: int) -> list[int]:
    return [c for c in children_of(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs /proc/PID/task/PID/children to find the worker")
def test_serve_tp2_answers_as_one_process_and_exits_when_a_worker_dies(model_factory):
    import openai

    from tests.serve.conftest import free_port
    from tests.serve.test_shutdown import start, wait_ready

    path = model_factory("llama", std=0.2)
    expected = [o.outputs[0].text for o in generate(path, 1)[:4]]
    port = free_port()
    proc = start(path, port, "--tensor-parallel-size", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        for prompt, text in zip(PROMPTS, expected):
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.choices[0].text == text
        (worker,) = _spawned_workers(proc.pid)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16)
        output, _ = proc.communicate(timeout=120)  # the server exits by itself
        assert proc.returncode == 1, output
        assert "tensor-parallel worker 1 exited (code -9)" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("arch,overrides", [("llama", {"attention_bias": True, "mlp_bias": True}),
                                            SLOW("qwen2", {}), SLOW("mixtral", {}), SLOW("phi3", {}),
                                            ("phi3", {"num_key_value_heads": 1}), SLOW("olmo2", {}),
                                            SLOW("gpt_oss", {})])
def test_weights_pushed_into_a_split_engine_serve_as_if_loaded(model_factory, arch, overrides):
    """An RL trainer's push (whole tensors by HF name) into TP=2: each rank keeps its piece; outputs equal a
    one-process engine that loaded the new weights (row-parallel biases on rank 0 only, tied embeddings,
    experts, Phi-3's fused q|k|v checkpoint tensors)."""
    from safetensors.torch import load_file

    old = model_factory(arch, seed=0, std=0.2, **overrides)
    new = model_factory(arch, seed=1, std=0.2, **overrides)
    tensors = {}
    for file in sorted(Path(new).glob("*.safetensors")):
        tensors.update(load_file(file))
    expected = [o.outputs[0].token_ids for o in generate(new, 1)]
    llm = LLM(str(old), dtype="float32", tensor_parallel_size=2)
    try:
        assert llm.update_weights(tensors, strict=True) == 1
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == expected
    finally:
        llm.engine.shutdown()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_a_rank_loads_its_share_not_the_whole_model(model_factory):
    # ~100 MB of fp32 weights; a rank of TP=2 keeps ~half. Loading piece by piece peaks at its share plus a
    # few checkpoint tensors; loading whole then splitting peaks at the whole model plus the share.
    import subprocess
    import sys

    path = model_factory("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=16000)

    def probe(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-m", "tests.engine.tp_load_memory", mode, str(path)],
                             capture_output=True, text=True, check=True)
        peak, weights = out.stdout.split()[-2:]
        return int(peak), int(weights)

    (whole, share), (piecewise, share_again) = probe("whole"), probe("shard")
    assert share == share_again
    assert piecewise < 0.7 * whole, (piecewise, whole, share)
    largest = 16000 * 512 * 4  # the embedding, in fp32: a few such tensors are in flight while one loads
    assert piecewise < share + 3 * largest, (piecewise, share)


@pytest.mark.parametrize("arch,weight_type,kv_heads", [SLOW("llama", "Q4_1", 2), SLOW("llama", "Q8_0", 2),
                                                     SLOW("qwen2", "Q4_0", 2), ("llama", "Q4_1", 1)])
def test_quantized_gguf_splits_in_its_blocks(model_factory, tmp_path, arch, weight_type, kv_heads):
    # q/k/v/gate/up cut by rows and o/down by whole groups of input columns, still quantized; the embedding
    # dequantized (vocabulary-parallel). Against TP=1 on the same file: the same tokens up to the integer
    # kernels' per-row activation rounding, which now covers half a row (teacher-forced logprobs within 0.02).
    from ember.models.quant import QuantizedLinear
    from tests.models.gguf_files import write_gguf

    path = write_gguf(model_factory(arch, std=0.2, num_key_value_heads=kv_heads), tmp_path / f"{arch}-{weight_type}.gguf",
                      weight_type)
    one = prompt_logprobs(path, 1, "float32")
    two = prompt_logprobs(path, 2, "float32")
    assert (two - one).abs().max() < 0.02
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=2)
    try:
        kinds = {type(m) for m in llm.engine.model.modules()}
        from ember.models import cpu_ops

        if weight_type.startswith("Q4") or cpu_ops.int_kernels_available():
            assert QuantizedLinear in kinds, kinds
        got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:4]],
                           SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5), use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert check_logprobs_close(got, generate(path, 1)[:4]) >= 0.5


def write_adapter(base: Path, out: Path, seed: int, rank: int, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A PEFT adapter directory with random A and B on `modules` (their last name component) of every layer;
    returns its tensors."""
    import json

    from safetensors.torch import save_file

    from ember.models import load_model
    from ember.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_targets

    model, _ = load_model(str(base), dtype="float32")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, target in sorted(lora_targets(model).items()):
        if name.rsplit(".", 1)[-1] in modules:
            for part, shape in (("A", (rank, target.in_features)), ("B", (target.size, rank))):
                tensors[f"base_model.model.{name}.lora_{part}.weight"] = torch.randn(shape, generator=gen) * 0.3
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                  "target_modules": list(modules)}))
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    return tensors


@pytest.mark.parametrize("arch,overrides", [("llama", {}), SLOW("qwen2_moe", {}), ("phi3", {"num_key_value_heads": 1})])
def test_lora_adapters_split_over_ranks_answer_as_one_process(model_factory, tmp_path, arch, overrides):
    """Adapters on column-parallel (q/k/v, gate/up: B cut by head or channel), row-parallel (o, down: A cut by
    input column) and replicated (a MoE router) projections, three of them and the base in one batch with two
    slots (adapters swap in and out), then an RL push of new adapter weights: TP=2 gives one process's tokens.
    Phi-3: one KV head (replicated) and its fused q|k|v and gate|up checkpoint rows."""
    from ember.engine.lora import LoRARequest

    path = model_factory(arch, std=0.2, **overrides)
    kinds = [("q_proj", "v_proj", "down_proj"), ("k_proj", "o_proj", "gate_proj", "up_proj", "gate"),
             ("qkv_proj", "gate_up_proj", "o_proj")]
    adapters = []
    for i, modules in enumerate(kinds):
        tensors = write_adapter(path, tmp_path / f"a{i}", i, 4 + 2 * i, modules)
        if tensors:  # (each architecture names its projections its own way: some kinds adapt nothing here)
            adapters.append(LoRARequest(f"a{i}", i + 1, str(tmp_path / f"a{i}")))
    assert len(adapters) >= 2
    pushed = {k: v.flip(0) for k, v in write_adapter(path, tmp_path / "b", 9, 4, kinds[0]).items()} \
        if adapters[0].lora_name == "a0" else None
    loras = [None if i % (len(adapters) + 1) == 0 else adapters[i % (len(adapters) + 1) - 1] for i in range(len(PROMPTS))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]

    def run(tp: int):
        llm = LLM(str(path), dtype="float32", tensor_parallel_size=tp, enable_lora=True, max_loras=2, max_lora_rank=8)
        try:
            first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]
            second = None
            if pushed is not None:
                assert llm.update_lora(adapters[0], pushed) == 1
                second = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False,
                                                                       lora_request=loras)]
            return first, second
        finally:
            llm.engine.shutdown()

    one, two = run(1), run(2)
    assert two == one
    base = [o.outputs[0].token_ids for o in generate(path, 1)]
    adapted = [i for i, lora in enumerate(loras) if lora is not None]
    assert any(one[0][i] != base[i][:12] for i in adapted)  # the adapters change the answers
    if pushed is not None:
        assert one[1] != one[0]  # and so does the push


@pytest.mark.parametrize("fmt,bits,group,arch", [("gptq", 4, 32, "qwen2"), SLOW("gptq", 8, -1, "qwen2"),
                                                  ("awq", 4, 32, "qwen2"), SLOW("gptq", 4, 32, "phi3")])
def test_gptq_and_awq_checkpoints_split_once_unpacked(model_factory, tmp_path, fmt, bits, group, arch):
    """A GPTQ/AWQ checkpoint over 2 ranks: each projection is unpacked, cut (rows; or whole groups of input
    columns) and packed again for its rank: the tokens of one process on the same checkpoint (qwen2: q/k/v
    biases, tied embeddings; phi3: fused q|k|v and gate|up tensors)."""
    from tests.models.test_quant import write_quantized

    src = model_factory(arch, hidden_size=128, intermediate_size=256, std=0.2)
    write_quantized(src, tmp_path / "q", fmt, bits, group)
    one, two = generate(tmp_path / "q", 1), generate(tmp_path / "q", 2)
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]


def test_act_order_gptq_is_refused_by_name(model_factory, tmp_path):
    from tests.models.test_quant import write_quantized

    src = model_factory("qwen2", hidden_size=128, intermediate_size=256, std=0.2)
    write_quantized(src, tmp_path / "q", "gptq", 4, 64, act_order=True)
    with pytest.raises(ValueError, match=r"act-order \(desc_act\)"):
        generate(tmp_path / "q", 2)
    assert len(generate(src, 2)) == len(PROMPTS)  # the refused start left nothing behind (workers, process group)


def test_split_engines_leave_the_default_process_group_alone(model_factory, tmp_path):
    """On CPU the ranks meet in a gloo group of their own: a trainer's default process group in the same process
    (an RL loop's) keeps working beside two tensor-parallel engines, and is still there after they stop."""
    import torch.distributed as dist

    path = model_factory("llama", std=0.2)
    expected = [o.outputs[0].token_ids for o in generate(path, 1)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        engines = [LLM(str(path), dtype="float32", tensor_parallel_size=2) for _ in range(2)]
        try:
            params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
            for llm in engines:
                got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
                assert [o.outputs[0].token_ids for o in got] == expected
            t = torch.ones(3)
            dist.all_reduce(t)
            assert t.tolist() == [1.0, 1.0, 1.0]
        finally:
            for llm in engines:
                llm.engine.shutdown()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_an_engine_started_from_a_passing_thread_keeps_its_workers(model_factory):
    """Workers ask to die with their parent (PR_SET_PDEATHSIG), which the kernel ties to the thread that started
    them: an engine built on a thread that then ends (a pool's, a server's start-up task) must keep them."""
    import threading

    path = model_factory("llama", std=0.2)
    expected = [o.outputs[0].token_ids for o in generate(path, 1)]
    built = []
    thread = threading.Thread(target=lambda: built.append(LLM(str(path), dtype="float32", tensor_parallel_size=2)))
    thread.start()
    thread.join()
    llm = built[0]
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == expected
    finally:
        llm.engine.shutdown()
