"""The two timed calls for one shape, on identical inputs for every method.

* ``end_to_end``: prompt in, decoded images out (text encoding, denoising loop, VAE decode).
* ``denoise``: precomputed prompt embeddings in, final latents out (``output_type="latent"``):
  the denoising loop alone, which is what caching accelerates.

Both use a CPU generator seeded the same way on every call, so every method starts from the same
noise and the outputs can be compared pixel by pixel with the plain pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .methods import Shape


class _Captured(Exception):
    """Raised by the capture hook to stop the pipeline after its first U-Net call."""


@dataclass
class UNetInputs:
    """The arguments of a real U-Net call of the pipeline, and the scheduler's timesteps."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    timesteps: torch.Tensor

    def call(self, unet: Any, index: int) -> Any:
        """Call `unet` as the pipeline does at the `index`-th timestep."""
        args = (self.args[0], self.timesteps[index]) + self.args[2:]
        return unet(*args, **self.kwargs)


def _clone(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


@dataclass
class Workload:
    """One pipeline at one shape with a fixed prompt, seed, step count and guidance scale."""

    pipe: Any
    shape: Shape
    steps: int
    prompt: str
    seed: int
    guidance_scale: float
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.pipe, "text_encoder_2", None) is not None

    def call_kwargs(self) -> dict[str, Any]:
        """Call arguments that fix U-Net input shapes beyond size and batch (fastcache's warmup too)."""
        return {"guidance_scale": self.guidance_scale}

    def _common(self) -> dict[str, Any]:
        return dict(
            height=self.shape.height, width=self.shape.width, num_images_per_prompt=self.shape.batch,
            num_inference_steps=self.steps, generator=torch.Generator("cpu").manual_seed(self.seed),
            **self.call_kwargs(),
        )

    def prepare(self) -> None:
        """Encode the prompt once (untimed) for the denoising-loop-only calls."""
        device = self.pipe._execution_device
        guidance = self.guidance_scale > 1.0
        with torch.no_grad():
            if self.is_sdxl:
                pe, npe, pooled, npooled = self.pipe.encode_prompt(
                    self.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance
                )
                self.embeddings = dict(prompt_embeds=pe, negative_prompt_embeds=npe,
                                       pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled)
            else:
                pe, npe = self.pipe.encode_prompt(self.prompt, device, 1, guidance)
                self.embeddings = dict(prompt_embeds=pe, negative_prompt_embeds=npe)
        self.embeddings = {k: v for k, v in self.embeddings.items() if v is not None}

    def end_to_end(self) -> np.ndarray:
        """Decoded images, (batch, H, W, 3) floats in [0, 1]."""
        return self.pipe(self.prompt, output_type="np", **self._common()).images

    def denoise(self) -> torch.Tensor:
        """Final latents of the denoising loop, from precomputed embeddings."""
        if not self.embeddings:
            self.prepare()
        return self.pipe(output_type="latent", **self.embeddings, **self._common()).images

    def capture_unet_inputs(self) -> UNetInputs:
        """The first U-Net call of a denoising call, captured by a hook that then stops the call."""
        captured: list[UNetInputs] = []

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append(UNetInputs(_clone(args), _clone(kwargs), self.pipe.scheduler.timesteps.clone()))
            raise _Captured

        handle = self.pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.denoise()
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("the pipeline made no U-Net call")
        return captured[0]
