"""The published architectures of SD 1.5, SD 2.1 (768, v-prediction) and SDXL base, written out.

Benchmarks build them with random weights: speed does not depend on weight values, and no weights
can be downloaded here. Values are those of the public ``config.json`` files of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/, text_encoder_2/, scheduler/).
"""

from __future__ import annotations

from typing import Any

PRESETS = ("sd15", "sd21", "sdxl", "cpu-small")

_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
)

_UNETS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        _SD_BLOCKS, sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        act_fn="silu", downsample_padding=1, mid_block_scale_factor=1,
    ),
    "sd21": dict(
        _SD_BLOCKS, sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
        upcast_attention=True, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        act_fn="silu", downsample_padding=1, mid_block_scale_factor=1,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
        flip_sin_to_cos=True, freq_shift=0, act_fn="silu", downsample_padding=1, mid_block_scale_factor=1,
    ),
    # Not a published model: SD 1.5's block structure (4 levels, layers_per_block=2, cross-attention
    # in the first three, 12 DeepCache branches) with a fifth of its channels and a 256 px default,
    # so a whole benchmark, inductor compiles included, fits in minutes on 2 CPU cores in fp32.
    "cpu-small": dict(
        _SD_BLOCKS, block_out_channels=(64, 128, 256, 256), sample_size=32, in_channels=4, out_channels=4,
        layers_per_block=2, attention_head_dim=8, cross_attention_dim=256, norm_num_groups=32, norm_eps=1e-5,
        flip_sin_to_cos=True, freq_shift=0, act_fn="silu", downsample_padding=1, mid_block_scale_factor=1,
    ),
}

_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu",
)
_VAES = {
    "sd15": dict(_VAE, sample_size=512),
    "sd21": dict(_VAE, sample_size=768),
    "sdxl": dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "cpu-small": dict(_VAE, block_out_channels=(32, 64, 128, 128), sample_size=256),
}

# CLIP ViT-L/14 (SD 1.x, SDXL's first encoder); OpenCLIP ViT-H (SD 2.x); OpenCLIP ViT-bigG (SDXL's second).
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               projection_dim=768, hidden_act="quick_gelu")
_CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
               projection_dim=512, hidden_act="gelu")
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
               projection_dim=1280, hidden_act="gelu")
# cpu-small: a 4-layer CLIP-like encoder whose width matches its U-Net's cross_attention_dim.
_CLIP_SMALL = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4,
                   projection_dim=256, hidden_act="quick_gelu")
_TEXT = {"sd15": (_CLIP_L,), "sd21": (_CLIP_H,), "sdxl": (_CLIP_L, _CLIP_G), "cpu-small": (_CLIP_SMALL,)}

_SCHEDULERS = {
    "sd15": ("PNDMScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    "sd21": ("DDIMScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   prediction_type="v_prediction")),
    "sdxl": ("EulerDiscreteScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, timestep_spacing="leading")),
}

_SCHEDULERS["cpu-small"] = _SCHEDULERS["sd15"]

RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl": 1024, "cpu-small": 256}


def unet_config(preset: str) -> dict[str, Any]:
    return dict(_UNETS[preset])


def vae_config(preset: str) -> dict[str, Any]:
    return dict(_VAES[preset])


def text_encoder_configs(preset: str) -> tuple[dict[str, Any], ...]:
    """Per text encoder: CLIPTextConfig fields (vocabulary 49408, 77 positions)."""
    return tuple(dict(c, vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                      pad_token_id=1) for c in _TEXT[preset])


def scheduler(preset: str) -> Any:
    import diffusers

    name, config = _SCHEDULERS[preset]
    return getattr(diffusers, name)(**config)
