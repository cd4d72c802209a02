"""Hugging Face configuration classes for MiDashengLM checkpoints.

They mirror the published `configuration_midashenglm.py` field for field, so real
checkpoints' `config.json` files load unchanged; registering them with `AutoConfig`
(see `register()` in this package) is what lets them load without
`trust_remote_code=True`.
"""

from transformers import PretrainedConfig, Qwen2Config


class DashengConfig(PretrainedConfig):
    """The Dasheng audio encoder: log-mel front end and ViT over 40 ms patches."""

    model_type = "midashenglm_dasheng_encoder"

    def __init__(
        self,
        embed_dim: int = 768,
        outputdim: int = 527,
        patch_size: int | tuple[int, int] = 16,
        patch_stride: int | tuple[int, int] = 16,
        input_channels: int = 1,
        target_length: int = 1012,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        f_min: float = 0.0,
        f_max: float = 8000.0,
        center: bool = True,
        win_length: int = 512,
        hop_length: int = 160,
        sample_rate: int = 16000,
        n_fft: int = 512,
        n_mels: int = 64,
        **kwargs,
    ):
        self.embed_dim = embed_dim
        self.outputdim = outputdim
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.input_channels = input_channels
        self.target_length = target_length
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.init_values = init_values
        self.drop_rate = drop_rate
        self.attn_drop_rate = attn_drop_rate
        self.f_min = f_min
        self.f_max = f_max
        self.center = center
        self.win_length = win_length
        self.hop_length = hop_length
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.n_mels = n_mels
        super().__init__(**kwargs)


class MiDashengLMConfig(PretrainedConfig):
    """Encoder config + Qwen2 decoder config + the projector's subsampling factor."""

    model_type = "midashenglm"
    sub_configs = {"audio_encoder_config": DashengConfig, "text_config": Qwen2Config}

    def __init__(
        self,
        audio_encoder_config: dict | DashengConfig | None = None,
        subsample_factor: int = 5,
        text_config: dict | Qwen2Config | None = None,
        audio_token_id: int | None = None,
        **kwargs,
    ):
        if not isinstance(audio_encoder_config, DashengConfig):
            audio_encoder_config = DashengConfig(**(audio_encoder_config or {}))
        if not isinstance(text_config, Qwen2Config):
            text_config = dict(text_config or {})
            text_config.pop("model_type", None)
            text_config = Qwen2Config(**text_config)
        self.audio_encoder_config = audio_encoder_config
        self.text_config = text_config
        self.subsample_factor = subsample_factor
        self.audio_token_id = audio_token_id
        super().__init__(**kwargs)
