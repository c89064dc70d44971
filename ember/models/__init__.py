"""Model definitions: plain nn.Modules built from HF config.json, loaded from safetensors.

The registry maps HF `architectures` names to classes, imported lazily.
"""

from __future__ import annotations

import importlib

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "MixtralForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "Qwen2MoeForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "Qwen3MoeForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "Gemma2ForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "Gemma3ForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "Gemma3ForConditionalGeneration": "ember.models.llama:LlamaForCausalLM",  # the text tower (no images)
    "Phi3ForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "Olmo2ForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "SmolLM3ForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "GptOssForCausalLM": "ember.models.llama:LlamaForCausalLM",
    "GPT2LMHeadModel": "ember.models.gpt2:GPT2LMHeadModel",
    "BertModel": "ember.models.bert:BertModel",
}


def model_class(architecture: str):
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    module, name = ARCHITECTURES[architecture].split(":")
    return getattr(importlib.import_module(module), name)


from ember.models.config import ModelConfig  # noqa: E402
from ember.models.loader import load_model, hf_state_dict  # noqa: E402

__all__ = ["ARCHITECTURES", "ModelConfig", "load_model", "hf_state_dict", "model_class"]
