"""What `FastCache.warmup()` runs: one pipeline call per shape, largest first, and its report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .errors import InvalidConfigError

Shape = tuple[int | None, int | None, int]  # (height, width, batch_size); None: the pipeline's default


@dataclass(frozen=True)
class WarmupReport:
    """What one warmup() call prepared and how long it took."""

    seconds: float
    new_shapes: tuple[str, ...]
    compilations: int


def warmup_shapes(height: int | None, width: int | None, batch_size: int,
                  shapes: Sequence[Shape] | None) -> list[Shape]:
    """The shapes to prepare, largest first: their graphs share one memory pool, which the first
    capture sizes (as sglang's runner captures its largest batch first)."""
    if shapes is None:
        return [(height, width, batch_size)]
    if height is not None or width is not None or batch_size != 1:
        raise InvalidConfigError("warmup() takes shapes=[(height, width, batch_size), ...] or one height, "
                                 "width and batch_size, not both")
    return sorted(shapes, key=lambda shape: -((shape[0] or 0) * (shape[1] or 0) * shape[2]))


def warmup_call_kwargs(shape: Shape, num_inference_steps: int, decode: bool,
                       call_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline call that prepares `shape`: an empty prompt, latent output (images when
    `decode`, so that a compiled VAE decoder is prepared too), a fixed generator; `call_kwargs`
    (guidance, img2img's image and strength...) as the serving calls will pass them."""
    height, width, batch_size = shape
    kwargs: dict[str, Any] = dict(
        num_images_per_prompt=batch_size, num_inference_steps=num_inference_steps,
        output_type="np" if decode else "latent", generator=torch.Generator("cpu").manual_seed(0),
    )
    kwargs.update({name: value for name, value in (("height", height), ("width", width)) if value is not None})
    kwargs.update(call_kwargs)
    if "prompt_embeds" not in kwargs:
        kwargs.setdefault("prompt", "")
    return kwargs
