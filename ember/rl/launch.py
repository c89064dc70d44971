"""`ember rl grpo CONFIG [--nproc N]`: one process in place, or N under torchrun."""

from __future__ import annotations

import sys

from ember.rl.grpo import GRPOConfig


def launch(config_path: str, nproc: int = 1) -> int:
    from ember.rl.grpo import run

    GRPOConfig.load(config_path)  # validate before any process starts
    if nproc == 1:
        run(GRPOConfig.load(config_path))
        return 0
    from ember.train.faults import run_torchrun

    failure = run_torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", "ember.rl.launch", config_path],
                           "grpo")
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # a torchrun worker: a process of its own, so it sets up logging as the CLI does
    from ember.train.faults import die_with_parent

    die_with_parent()
    from ember.logs import configure_logging
    from ember.rl.grpo import run
    from ember.train.zero import run_worker

    configure_logging()
    run_worker(run, GRPOConfig.load(sys.argv[1]))
