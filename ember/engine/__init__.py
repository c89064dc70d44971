"""The serving engine: scheduler, paged KV cache, model runner, sampler."""

from ember.engine.config import CacheConfig, EngineConfig, SchedulerConfig

_LAZY = {  # torch loads only when these are first used (the CLI parses its flags without it)
    "LLM": "ember.engine.llm_engine", "LLMEngine": "ember.engine.llm_engine",
    "CompletionOutput": "ember.engine.request", "Logprob": "ember.engine.request",
    "RequestOutput": "ember.engine.request", "SamplingParams": "ember.engine.request",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ember.engine' has no attribute {name!r}")


__all__ = ["CacheConfig", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "Logprob",
           "RequestOutput", "SamplingParams", "SchedulerConfig"]
