"""GRPO on a verifiable toy task: rollouts on the engine, updates in the trainer, weights pushed
back in memory, in one job (`ember rl grpo CONFIG`, one process or `--nproc N` under torchrun).

Each iteration: every rank samples `group_size` completions for each of its prompts (the
engine's own sampled-token logprobs are the old policy's), scores them, normalises rewards
within each group, and takes a clipped policy-gradient step (optionally with a KL penalty to
the initial policy); the engine sleeps (KV cache freed) while the trainer works, and gets
the new weights every `push_interval` iterations.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ember.rl.tasks import DIGITS, SPECIALS, Task, write_task_tokenizer
from ember.train.config import ConfigError, OptimSpec, _check_keys

TINY_MODEL = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=96, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  vocab_size=len(SPECIALS) + len(DIGITS), tie_word_embeddings=True)


@dataclass(frozen=True)
class GRPOConfig:
    run_dir: str = "runs/grpo"
    model: dict[str, Any] = field(default_factory=dict)  # {"path": DIR} or HF config fields (from scratch)
    task: str = "reverse"
    task_length: int = 3
    steps: int = 300
    prompts_per_step: int = 16  # over all ranks
    group_size: int = 8
    max_new_tokens: int = 6
    temperature: float = 1.0
    lr: float = 3e-3
    clip: float = 0.2
    kl_coef: float = 0.0
    push_interval: int = 1
    zero_stage: int = 0
    eval_prompts: int = 64
    eval_interval: int = 25
    # Stop once the greedy evaluation reaches this accuracy (None: run all `steps`).
    target_accuracy: float | None = None
    seed: int = 0
    # Train a LoRA adapter instead of the model ({"r": 8, "lora_alpha": 16, "target_modules": "all-linear"});
    # the engine serves it and each push sends only the adapter.
    lora: dict[str, Any] | None = None

    def __post_init__(self):
        if self.task not in ("reverse", "sort", "add"):
            raise ConfigError(f"task: {self.task!r} is not one of reverse, sort, add")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "push_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= 1")
        if self.group_size < 2:
            raise ConfigError("group_size: GRPO needs at least 2 completions per prompt")
        if self.lora is not None:
            from ember.train.config import LoRASpec

            LoRASpec.from_dict(self.lora)  # validates (PEFT names accepted)

    @classmethod
    def load(cls, path: str | Path) -> "GRPOConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        _check_keys("", raw, {f.name for f in fields(cls)})
        return cls(**raw)


def _policy_dir(config: GRPOConfig, is_main: bool) -> Path:
    """The initial policy as an HF directory the engine loads (random init unless model.path)."""
    if config.model.get("path"):
        return Path(config.model["path"])
    from ember.models.loader import write_random_model

    out = Path(config.run_dir) / "policy0"
    if is_main and not (out / "config.json").is_file():
        write_task_tokenizer(out)
        write_random_model(out, {**TINY_MODEL, **config.model, "eos_token_id": 0}, seed=config.seed,
                           dtype=torch.float32)
    return out


class GRPO:
    def __init__(self, config: GRPOConfig):
        self.config = config

    def _setup(self) -> None:
        from ember import LLM
        from ember.models import load_model
        from ember.tokenizer import Tokenizer
        from ember.train.zero import init_distributed, shard

        c = self.config
        self.d = init_distributed()
        if c.prompts_per_step % self.d.world:
            raise ConfigError(f"prompts_per_step: {c.prompts_per_step} is not a multiple of the world size {self.d.world}")
        Path(c.run_dir).mkdir(parents=True, exist_ok=True)
        policy = _policy_dir(c, self.d.is_main)
        dist.barrier()
        self.tokenizer = Tokenizer(policy)
        torch.manual_seed(c.seed)
        model, _ = load_model(policy, dtype="float32")
        model.train()
        self.reference = copy.deepcopy(model).to(self.d.device).eval() if c.kl_coef > 0 else None
        self.lora_request = self._attach_lora(model) if c.lora is not None else None
        self.model, self.optimizer = shard(model, self.d, c.zero_stage, "fp32",
                                           OptimSpec(lr=c.lr, weight_decay=0.0, betas=(0.9, 0.99)))
        lora = {"enable_lora": True, "max_lora_rank": self.lora_spec.r} if self.lora_request else {}
        self.engine = LLM(str(policy), dtype="float32", kv_cache_gib=0.05, seed=c.seed + self.d.rank,
                          max_model_len=64, **lora)
        self.task = Task(c.task, c.task_length)
        self.rng = random.Random(c.seed * 1000 + self.d.rank)
        self.pad = self.tokenizer.hf.token_to_id("<pad>") or 0
        # Rollouts are constrained to digits then EOS (structured output): no samples are
        # wasted on markers, and every answer is checkable. Logprobs stay the model's own.
        from ember.engine.request import StructuredOutput

        self.answer_format = StructuredOutput(regex=f"[0-9]{{1,{max(1, c.max_new_tokens - 1)}}}")

    def _attach_lora(self, model):
        """Trainable adapters on the policy; the initial adapter (B = 0: the base policy) written where the
        engine reads it. Returns the engine's LoRARequest for it."""
        from ember.engine.lora import LoRARequest
        from ember.models.lora import adapter_state, add_trainable_lora, save_adapter, trainable_adapters
        from ember.train.config import LoRASpec

        spec = self.lora_spec = LoRASpec.from_dict(self.config.lora)
        torch.manual_seed(self.config.seed)  # the same A on every rank
        names = add_trainable_lora(model, spec.r, spec.alpha, spec.dropout, spec.target_modules, spec.use_rslora)
        path = Path(self.config.run_dir) / "adapter0"
        if self.d.is_main:
            save_adapter(adapter_state(trainable_adapters(model)), path, spec.r, spec.alpha, spec.dropout,
                         sorted({n.rsplit(".", 1)[-1] for n in names}), None, spec.use_rslora)
        dist.barrier()
        return LoRARequest("policy", 1, str(path))

    # ---- pieces ---------------------------------------------------------------------------
    def rollout(self, num_prompts: int) -> list[dict[str, Any]]:
        from ember import SamplingParams

        c = self.config
        prompts = [self.task.sample(self.rng) for _ in range(num_prompts)]
        params = SamplingParams(n=c.group_size, temperature=c.temperature, max_tokens=c.max_new_tokens, logprobs=0,
                                seed=self.rng.randrange(1 << 30), structured=self.answer_format)
        outputs = self.engine.generate([p for p, _ in prompts], params, use_tqdm=False, lora_request=self.lora_request)
        samples = []
        for (prompt, answer), out in zip(prompts, outputs):
            group = []
            for comp in out.outputs:
                reward, exact = Task.reward(comp.text, answer)
                old = [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids)]
                group.append({"prompt_ids": out.prompt_token_ids, "ids": comp.token_ids, "old": old,
                              "reward": reward, "exact": exact})
            rewards = torch.tensor([g["reward"] for g in group])
            advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
            for g, a in zip(group, advantages.tolist()):
                g["advantage"] = a
            samples += group
        return samples

    def train_step(self, samples: list[dict[str, Any]]) -> dict[str, float]:
        c = self.config
        rows = [s["prompt_ids"] + s["ids"] for s in samples]
        width = max(len(r) for r in rows)
        inputs = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        mask = torch.zeros(len(rows), width - 1)
        old = torch.zeros(len(rows), width - 1)
        advantages = torch.tensor([s["advantage"] for s in samples])[:, None]
        for i, s in enumerate(samples):
            start = len(s["prompt_ids"]) - 1  # position predicting the first completion token
            mask[i, start:start + len(s["ids"])] = 1
            old[i, start:start + len(s["ids"])] = torch.tensor(s["old"])
        device = self.d.device
        inputs, mask, old, advantages = (t.to(device) for t in (inputs, mask, old, advantages))
        logits = self.model(inputs)[:, :-1].float()
        new = logits.log_softmax(-1).gather(2, inputs[:, 1:, None]).squeeze(2)
        ratio = torch.exp(((new - old) * mask).clamp(-20.0, 20.0))  # masked positions: ratio 1
        surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - c.clip, 1 + c.clip) * advantages)
        per_token = -surrogate
        kl = torch.zeros((), device=device)
        if self.reference is not None:
            with torch.no_grad():
                ref = self.reference(inputs)[:, :-1].float().log_softmax(-1).gather(2, inputs[:, 1:, None]).squeeze(2)
            delta = ref - new
            per_token_kl = torch.exp(delta) - delta - 1  # k3, unbiased and >= 0
            per_token = per_token + c.kl_coef * per_token_kl
            kl = torch.where(mask.bool(), per_token_kl, 0.0).sum() / mask.sum()
        loss = torch.where(mask.bool(), per_token, 0.0).sum() / mask.sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        if torch.isfinite(norm):  # a non-finite gradient would poison the policy: skip that update
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "kl": float(kl), "train_tokens": int(mask.sum())}

    def push(self) -> float:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        start = time.perf_counter()
        lora = self.lora_request is not None  # then only the adapter is gathered and travels
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                          ignore_frozen_params=lora))
        if not lora:
            self.engine.update_weights(state)
        else:
            from ember.models.lora import adapter_tensors

            self.engine.update_lora(self.lora_request, adapter_tensors(self.model, state))
        return time.perf_counter() - start

    def evaluate(self) -> float:
        """Greedy exact-match accuracy on fresh prompts (all ranks together)."""
        from ember import SamplingParams

        rng = random.Random(12345 + self.d.rank)
        prompts = [self.task.sample(rng) for _ in range(self.config.eval_prompts // self.d.world)]
        outs = self.engine.generate([p for p, _ in prompts], SamplingParams(
            temperature=0, max_tokens=self.config.max_new_tokens, structured=self.answer_format), use_tqdm=False,
            lora_request=self.lora_request)
        hits = torch.tensor(float(sum(o.outputs[0].text == a for (_, a), o in zip(prompts, outs))), device=self.d.device)
        dist.all_reduce(hits)
        return hits.item() / (len(prompts) * self.d.world)

    def _mean(self, value: float) -> float:
        t = torch.tensor(float(value), device=self.d.device)
        dist.all_reduce(t)
        return t.item() / self.d.world

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self._setup()
        c, d = self.config, self.d
        metrics_file = Path(c.run_dir) / "metrics.jsonl"
        if d.is_main:
            metrics_file.write_text("")
        record: dict[str, Any] = {"step": 0, "accuracy_greedy": self.evaluate()}
        if d.is_main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar = tqdm(range(c.steps), desc="grpo", unit="step", disable=not d.is_main)
        for step in bar:
            t0 = time.perf_counter()
            self.engine.wake()
            samples = self.rollout(c.prompts_per_step // d.world)
            t1 = time.perf_counter()
            self.engine.sleep()
            stats = self.train_step(samples)
            t2 = time.perf_counter()
            push_s = self.push() if (step + 1) % c.push_interval == 0 else 0.0
            rollout_tokens = sum(len(s["ids"]) for s in samples)
            record = {
                "step": step + 1,
                "reward_mean": self._mean(sum(s["reward"] for s in samples) / len(samples)),
                "accuracy": self._mean(sum(s["exact"] for s in samples) / len(samples)),
                "loss": self._mean(stats["loss"]), "kl": self._mean(stats["kl"]),
                "rollout_s": t1 - t0, "train_s": t2 - t1, "push_s": push_s,
                "rollout_tokens_per_s": rollout_tokens / (t1 - t0),
                "train_tokens_per_s": stats["train_tokens"] / (t2 - t1), "tokens_per_s": rollout_tokens / (t1 - t0),
                "weight_version": self.engine.engine.weight_version,
            }
            if c.eval_interval and (step + 1) % c.eval_interval == 0 or step + 1 == c.steps:
                self.engine.wake()
                record["accuracy_greedy"] = self.evaluate()
            if d.is_main:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.2f}")
            if c.target_accuracy is not None and record.get("accuracy_greedy", 0.0) >= c.target_accuracy:
                break  # every rank evaluated the same greedy prompts, so all stop together
        bar.close()
        return record


def run(config: GRPOConfig) -> dict[str, Any]:
    try:
        return GRPO(config).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def describe(config: GRPOConfig) -> str:
    return json.dumps(asdict(config), indent=2)
