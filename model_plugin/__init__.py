"""vLLM plugin for MiDashengLM (entry point group `vllm.general_plugins`).

`register()` runs in every vLLM process (API server, engine core, workers), so it stays
cheap: it imports no torch module of ours and touches no device. The model class is
registered by its "module:Class" string and imported only when vLLM builds the model.
"""

ARCHITECTURE = "MiDashengLMModel"
MODEL_CLASS = "mdlserve.model_plugin.model:MiDashengLMModel"


def register() -> None:
    """Make `MiDashengLMModel` checkpoints load through this package. Safe to call twice."""
    from transformers import AutoConfig, AutoProcessor
    from vllm import ModelRegistry

    from .config import DashengConfig, MiDashengLMConfig
    from .processing import MiDashengLMProcessor

    AutoConfig.register(DashengConfig.model_type, DashengConfig, exist_ok=True)
    AutoConfig.register(MiDashengLMConfig.model_type, MiDashengLMConfig, exist_ok=True)
    AutoProcessor.register(MiDashengLMConfig, MiDashengLMProcessor, exist_ok=True)
    # Replaces vLLM's built-in implementation of the same architecture name.
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
