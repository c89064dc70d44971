"""The serving engine: scheduler, paged KV cache, model runner, sampler."""

from ember.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from ember.engine.llm_engine import LLM, LLMEngine
from ember.engine.request import CompletionOutput, Logprob, RequestOutput, SamplingParams

__all__ = [
    "CacheConfig", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "Logprob",
    "RequestOutput", "SamplingParams", "SchedulerConfig",
]
