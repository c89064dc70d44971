"""Save at ZeRO stage a on w processes, resume at stage b on v processes: the losses after the resume
point are the uninterrupted run's. Every (a, b) once; w is 1 for even a and 2 for odd a, v alternates
with b, so each of the four (w, v) pairs occurs four times (4 saving runs + 16 resumed runs)."""

from __future__ import annotations

import pytest

from tests.train.conftest import losses, train, write_config

STEPS, SAVE = 6, 3
PAIRS = [(a, b) for a in range(4) for b in range(4)]


def worlds(a: int, b: int) -> tuple[int, int]:
    return 1 + a % 2, 1 + (a + b) % 2


@pytest.fixture(scope="module")
def saved(train_assets, tmp_path_factory):
    """stage a -> (its uninterrupted losses, the checkpoint at step SAVE), run on worlds(a, .)[0] processes."""
    runs = {}

    def get(a: int):
        if a not in runs:
            directory = tmp_path_factory.mktemp(f"save-stage{a}")
            records = train(write_config(directory, train_assets, zero_stage=a, max_steps=STEPS, save_interval=SAVE),
                            nproc=worlds(a, 0)[0])
            runs[a] = losses(records), directory / "run" / "checkpoints" / f"step-{SAVE}"
        return runs[a]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}x{worlds(a, b)[0]}-to-{b}x{worlds(a, b)[1]}" for a, b in PAIRS])
def test_resume_matrix(saved, train_assets, tmp_path, a, b):
    reference, checkpoint = saved(a)
    assert checkpoint.is_dir()
    resumed = losses(train(write_config(tmp_path, train_assets, zero_stage=b, max_steps=STEPS, resume=str(checkpoint)),
                           nproc=worlds(a, b)[1]))
    assert sorted(resumed) == list(range(SAVE + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert abs(loss - reference[step]) <= 1e-5 * abs(reference[step]), (step, loss, reference[step])
