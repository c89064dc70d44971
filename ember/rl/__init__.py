"""RL post-training: the trainer pushes weights into the engine; both agree on log-probabilities."""

from ember.rl.bridge import push_weights

__all__ = ["push_weights"]
