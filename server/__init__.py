"""OpenAI-compatible gateway around vLLM's in-process async engine."""
