"""Benchmark presets: which pipeline to build, at which default resolution and step count.

Every pipeline has random weights (speed does not depend on weight values, and nothing can be
downloaded): ``sd15``/``sd21``/``sdxl`` are the published architectures of `bench.configs`,
``cpu-small`` is a reduced SD 1.5-shaped model that runs on two CPU cores in minutes, ``tiny`` and
``tiny-sdxl`` are `fastcache.tiny`'s SD and SDXL pipelines (smoke tests). All use the offline character-level tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import configs


@dataclass(frozen=True)
class Preset:
    """A named pipeline recipe and the defaults the benchmark uses for it."""

    name: str
    description: str
    resolution: int
    steps: int
    build: Callable[[torch.device, torch.dtype, int], Any]


def _finish(pipe: Any, device: torch.device, dtype: torch.dtype) -> Any:
    pipe = pipe.to(device)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_encoders(text_configs: tuple[dict[str, Any], ...]) -> list[Any]:
    """CLIPTextModel for the first encoder, CLIPTextModelWithProjection for SDXL's second."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    classes = (CLIPTextModel, CLIPTextModelWithProjection)
    return [classes[min(i, 1)](CLIPTextConfig(**c)) for i, c in enumerate(text_configs)]


def build_from_configs(
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    text_configs: tuple[dict[str, Any], ...],
    scheduler: Any,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> Any:
    """A StableDiffusion(XL)Pipeline with random weights from architecture dicts.

    Modules are created under ``torch.device(device)`` so that multi-billion-parameter U-Nets are
    initialised on the GPU instead of spending minutes in CPU random init.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from fastcache.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        encoders = _text_encoders(text_configs)
    if len(encoders) == 2:
        pipe = StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
            tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=tiny_tokenizer(), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return _finish(pipe, device, dtype)


def _published(name: str) -> Callable[[torch.device, torch.dtype, int], Any]:
    def build(device: torch.device, dtype: torch.dtype, seed: int) -> Any:
        return build_from_configs(
            configs.unet_config(name), configs.vae_config(name), configs.text_encoder_configs(name),
            configs.scheduler(name), device, dtype, seed,
        )

    return build


def _tiny(device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    from fastcache.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=seed, device=device, dtype=dtype)


def _tiny_sdxl(device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    from fastcache.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=seed, device=device, dtype=dtype)


PRESETS: dict[str, Preset] = {
    "sd15": Preset("sd15", "SD 1.5 architecture (random weights), PNDM", configs.RESOLUTION["sd15"], 50,
                   _published("sd15")),
    "sd21": Preset("sd21", "SD 2.1 768 architecture, v-prediction (random weights), DDIM", configs.RESOLUTION["sd21"],
                   50, _published("sd21")),
    "sdxl": Preset("sdxl", "SDXL base architecture, both text encoders, text_time conditions (random weights), Euler",
                   configs.RESOLUTION["sdxl"], 50, _published("sdxl")),
    "cpu-small": Preset("cpu-small", "reduced SD 1.5-shaped U-Net for 2 CPU cores (random weights), PNDM",
                        configs.RESOLUTION["cpu-small"], 20, _published("cpu-small")),
    "tiny": Preset("tiny", "fastcache.tiny SD pipeline (random weights), DDIM", 128, 2, _tiny),
    # The SDXL code path (two text encoders, pooled embeddings, text_time conditions) in seconds.
    "tiny-sdxl": Preset("tiny-sdxl", "fastcache.tiny SDXL pipeline (random weights), Euler", 128, 2, _tiny_sdxl),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
