"""ZeRO-sharded training of ember's model classes (DeepSpeed's role), on PyTorch's distributed pieces."""

from ember.train.config import ConfigError, TrainConfig


def __getattr__(name):
    if name == "Trainer":
        from ember.train.trainer import Trainer

        return Trainer
    raise AttributeError(name)


__all__ = ["ConfigError", "TrainConfig", "Trainer"]
