"""W1 with LoRA: the same requests spread over several adapters (rank R on every projection) against
the base model alone, in one engine, runs alternating. Adapters are random, written in PEFT's format."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def write_random_adapters(model_dir: str, out_dir: Path, count: int, rank: int, seed: int = 0) -> list[Path]:
    """`count` PEFT adapters of rank `rank` on every decoder projection, with non-zero random A and B."""
    from ember.models import load_model
    from ember.models.lora import ALL_LINEAR, adapter_state, add_trainable_lora, save_adapter, trainable_adapters

    paths = []
    for i in range(count):
        model, _ = load_model(model_dir, dtype="float32")
        torch.manual_seed(seed + i)
        names = add_trainable_lora(model, rank, 2.0 * rank, target_modules=ALL_LINEAR)
        adapters = trainable_adapters(model)
        with torch.no_grad():
            for adapter in adapters.values():
                for b in adapter.lora_B.values():
                    b.normal_(0, 0.02)
        targets = sorted({n.rsplit(".", 1)[-1] for n in names})
        paths.append(save_adapter(adapter_state(adapters), out_dir / f"adapter-{i}", rank, 2.0 * rank, 0.0,
                                  targets, model_dir))
    return paths


def compare(model_dir: str, workload, adapters: list[Path], dtype: str, runs: int, max_loras: int) -> dict:
    """Output tok/s of the workload on the base model and spread over the adapters, alternating."""
    from ember import LLM, SamplingParams
    from ember.engine.lora import LoRARequest

    rank = max(int(__import__("json").loads((p / "adapter_config.json").read_text())["r"]) for p in adapters)
    llm = LLM(model_dir, dtype=dtype, enable_lora=True, max_loras=max_loras, max_lora_rank=rank)
    requests = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    spread = [requests[i % len(requests)] for i in range(len(workload.prompts))]
    params = SamplingParams(temperature=0, max_tokens=workload.max_tokens, ignore_eos=True)
    results: dict[str, list[float]] = {"base": [], "lora": []}
    llm.generate(workload.prompts[:len(requests)], SamplingParams(max_tokens=2), use_tqdm=False,
                 lora_request=requests)  # read the adapters before timing
    for _ in range(runs):
        for kind, lora in (("base", None), ("lora", spread)):
            llm.engine.kv.reset_prefix_cache()
            start = time.perf_counter()
            outs = llm.generate(workload.prompts, params, use_tqdm=False, lora_request=lora)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            results[kind].append(tokens / seconds)
            print(f"  {kind}: {tokens / seconds:.1f} output tok/s ({seconds:.2f} s)", flush=True)
    return results
