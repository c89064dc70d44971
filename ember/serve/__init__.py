"""The OpenAI-compatible HTTP layer: it tokenizes, submits to AsyncLLM and streams; it owns no model state."""
