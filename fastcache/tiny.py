"""Tiny Stable Diffusion pipelines built offline from configs (random weights).

They are the embedded default of ``python -m fastcache demo`` and the models of the test suite: the
same diffusers classes and data flow as SD 1.x, SD 2.x and SDXL (4 and 3 U-Net levels, cross-attention,
``text_time`` conditions, an 8x VAE), small enough to run, and compile, on two CPU cores. The
tokenizer is a character-level CLIP BPE written from a small vocabulary, so nothing is downloaded.
"""

from __future__ import annotations

import string
from typing import Any, Callable

import torch

_CHARACTERS = string.ascii_lowercase + string.digits + ".,!?'-"
SD2_TEXT_WIDTH = 48  # wider than SD 1.x's 32, as OpenCLIP's 1024 is wider than CLIP's 768


def tiny_tokenizer(model_max_length: int = 77) -> Any:
    """A CLIP tokenizer over single characters (no merges): every word is spelled out."""
    from transformers import CLIPTokenizer

    special = ["<|startoftext|>", "<|endoftext|>"]
    tokens = special + list(_CHARACTERS) + [c + "</w>" for c in _CHARACTERS]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _text_config(vocab_size: int, hidden_size: int = 32, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=128,
    )


def tiny_sd_unet(sample_size: int = 16, in_channels: int = 4, **variant: Any) -> Any:
    """An SD 1.x-shaped U-Net: 3 cross-attention down blocks, a plain deepest block, 12 branches.

    ``in_channels=9`` gives an inpainting U-Net (latents, mask, masked-image latents); `variant`
    overrides other config values (`tiny_sd2_unet`).
    """
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    return UNet2DConditionModel(**{**config, **variant})


def two_level_sd_unet(sample_size: int = 16) -> Any:
    """SD 1.x's block types at two levels of one layer each (4 branches): about half the tiny
    U-Net's dynamo trace and inductor compile (warm-up 3.4 against 6.2 s, a cold compile 38
    against 74 s on 2 CPU cores). For tests of runtime mechanics (strict serving, recompile
    counts, compile caches) that need no deep U-Net."""
    return tiny_sd_unet(sample_size, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_sd2_unet(sample_size: int = 16) -> Any:
    """An SD 2.x-shaped U-Net: SD 1.x's blocks with linear projections in and out of the
    transformers, a head size per level, upcast attention (2.1's 768-v) and a wider text width
    (OpenCLIP's)."""
    return tiny_sd_unet(sample_size, cross_attention_dim=SD2_TEXT_WIDTH, attention_head_dim=(2, 4, 8, 8),
                        use_linear_projection=True, upcast_attention=True)


def tiny_sdxl_unet(sample_size: int = 16, refiner: bool = False) -> Any:
    """An SDXL-shaped U-Net: a plain first block, ``text_time`` conditions, 9 branches.

    ``refiner=True``: the refiner's conditioning (5 time ids with an aesthetic score, text
    embeddings from the second encoder only, so a 32-wide cross-attention).
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=(5 if refiner else 6) * 8 + 32,
        cross_attention_dim=32 if refiner else 64,
        norm_num_groups=8,
    )


def _finish(pipe: Any, device: str | torch.device, dtype: torch.dtype) -> Any:
    pipe = pipe.to(device)
    if dtype != torch.float32:  # .to(dtype) warns even when there is nothing to keep in fp32
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    pipeline_class: Any = None, in_channels: int = 4,
) -> Any:
    """A StableDiffusionPipeline with tiny random weights (default image 128x128, latents 16x16).

    `pipeline_class` builds another SD pipeline from the same components (img2img, inpaint...).
    """
    return _sd_pipeline(seed, device, dtype, pipeline_class, lambda: tiny_sd_unet(in_channels=in_channels))


def two_level_sd_pipeline(seed: int = 0) -> Any:
    """`tiny_sd_pipeline` around `two_level_sd_unet` (default image 128x128)."""
    return _sd_pipeline(seed, "cpu", torch.float32, None, two_level_sd_unet)


def tiny_sd2_pipeline(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A StableDiffusionPipeline shaped like SD 2.1 (768-v): `tiny_sd2_unet`, a 48-wide text
    encoder, and a v-prediction DDIM scheduler (default image 128x128)."""
    return _sd_pipeline(seed, device, dtype, None, tiny_sd2_unet, text_width=SD2_TEXT_WIDTH,
                        prediction_type="v_prediction")


def _sd_pipeline(seed: int, device: str | torch.device, dtype: torch.dtype, pipeline_class: Any,
                 make_unet: Callable[[], Any], text_width: int = 32, **scheduler: Any) -> Any:
    """An SD 1.x/2.x pipeline around `make_unet()`, its weights drawn after ``manual_seed(seed)``
    in a fixed order (U-Net, VAE, text encoder); `scheduler`: DDIM settings beside the defaults."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    pipe = (pipeline_class or StableDiffusionPipeline)(
        unet=make_unet(),
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer), hidden_size=text_width, projection_dim=text_width)),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1, **scheduler,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe, device, dtype)


def tiny_sdxl_pipeline(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    pipeline_class: Any = None,
) -> Any:
    """A StableDiffusionXLPipeline with tiny random weights and both text encoders.

    `pipeline_class` builds another SDXL pipeline from the same components (img2img, inpaint).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    pipe = (pipeline_class or StableDiffusionXLPipeline)(
        unet=tiny_sdxl_unet(),
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        ),
        force_zeros_for_empty_prompt=True,
    )
    return _finish(pipe, device, dtype)


def tiny_sdxl_refiner(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """An SDXL refiner: StableDiffusionXLImg2ImgPipeline, second text encoder only, aesthetic score."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    pipe = StableDiffusionXLImg2ImgPipeline(
        unet=tiny_sdxl_unet(refiner=True),
        vae=_tiny_vae(),
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer=None,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        ),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    return _finish(pipe, device, dtype)


def tiny_controlnet(unet: Any, seed: int = 0) -> Any:
    """A ControlNet copied from `unet` (diffusers' ``from_unet``), for 128x128 control images.

    ControlNets start with zero-initialised output convolutions, which would make their residuals
    zero and any test of them vacuous; here those are randomised so the residuals matter.
    """
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    with torch.no_grad():
        for conv in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.05)
            conv.bias.normal_(0.0, 0.05)
    return controlnet.to(device=unet.device, dtype=unet.dtype)
