"""Correctness tests of the vLLM plugin (model_plugin/) against a reference and vLLM's built-in."""
