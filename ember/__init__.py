"""ember: a PyTorch-native LLM stack (paged-KV serving engine + ZeRO training) over one set of models."""

# The one place the version is written: pyproject.toml reads it (setuptools' `attr:`, statically).
__version__ = "0.1.0"

# No logging set up here: a library leaves that to its application. ember's own programs (the CLI,
# torchrun workers) call ember.logs.configure_logging().


def __getattr__(name):
    # Lazy, so `import ember` (and the CLI) stays fast and torch loads only when needed.
    if name in ("LLM", "SamplingParams", "LLMEngine", "RequestOutput"):
        import ember.engine as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'ember' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "LLMEngine", "RequestOutput", "__version__"]
