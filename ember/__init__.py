"""ember: a PyTorch-native LLM stack (paged-KV serving engine + ZeRO training) over one set of models."""

import logging as _logging

__version__ = "0.1.0"

_logger = _logging.getLogger("ember")
if not _logger.handlers:
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    _logger.addHandler(_handler)
    _logger.setLevel(_logging.INFO)
    _logger.propagate = False


def __getattr__(name):
    # Lazy, so `import ember` (and the CLI) stays fast and torch loads only when needed.
    if name in ("LLM", "SamplingParams", "LLMEngine", "RequestOutput"):
        import ember.engine as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'ember' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "LLMEngine", "RequestOutput", "__version__"]
