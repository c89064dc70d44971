"""torchrun worker: train with FSDP2 ZeRO-3 on 2 ranks, push the gathered weights into an engine on
rank 0, and compare the engine's prompt logprobs with the trainer's (run by test_bridge.py)."""

import json
import sys

import torch

from ember import LLM, SamplingParams
from ember.rl import push_weights
from ember.train.config import TrainConfig
from ember.train.trainer import Trainer
from ember.train.zero import run_worker


def main() -> None:
    config = TrainConfig.load(sys.argv[1])
    trainer = Trainer(config)
    trainer.fit()
    prompt = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = trainer.logprobs([prompt])[0]  # collective: every rank runs it
    engine = LLM(config.model.path, dtype="float32") if trainer.d.is_main else None
    result = push_weights(trainer, engine) if engine else trainer.state_dict_for_engine()
    if trainer.d.is_main:
        out = engine.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        got = [out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))]
        diff = max(abs(a - b) for a, b in zip(got, reference))
        with open(sys.argv[2], "w") as f:
            json.dump({"max_abs_diff": diff, "weight_version": result["weight_version"]}, f)
    torch.distributed.destroy_process_group()


run_worker(main)
