"""What runs the U-Net behind the server: fastcache, DeepCache's helper, or nothing (plain diffusers).

The server is otherwise the same for all three (same batching, queue, HTTP), so that the load test
compares the accelerators and nothing else. Each warms a shape with one pipeline call, so that lazy
initialisation (and for fastcache, compilation) happens before the server reports ready.
"""

from __future__ import annotations

import logging
from typing import Any

from .config import ServeConfig

logger = logging.getLogger("fastcache.serve")


class Accelerator:
    """Plain diffusers: the reference the other two are measured against."""

    name = "none"

    def __init__(self, pipe: Any, config: ServeConfig) -> None:
        self.pipe = pipe
        self.config = config

    def warm(self, width: int, height: int, batch_size: int, guidance_scale: float) -> None:
        """One short call at this shape (empty prompt, 3 steps, latents out), as fastcache's warmup does."""
        import torch

        self.pipe(prompt="", num_images_per_prompt=batch_size, num_inference_steps=3, height=height, width=width,
                  guidance_scale=guidance_scale, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(0))

    def warmed(self) -> None:
        """Every shape is warmed: later compilations count from here."""

    def compilations_since_warmup(self) -> int:
        return 0

    def step_counts(self) -> tuple[int, int] | None:
        """(refresh, cached) U-Net evaluations so far, where the accelerator counts them."""
        return None

    def healthy(self) -> str | None:
        """Why the accelerator cannot serve any more (None while it can)."""
        return None

    def close(self) -> None:
        """Restore the pipeline."""


class DeepCacheAccelerator(Accelerator):
    """The DeepCache 0.1.1 package's helper (``pip install DeepCache``), as its README shows."""

    name = "deepcache"

    def __init__(self, pipe: Any, config: ServeConfig) -> None:
        super().__init__(pipe, config)
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError as error:
            raise RuntimeError("--accelerator deepcache needs the DeepCache package: pip install DeepCache") from error
        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.helper.set_params(cache_interval=config.cache_interval, cache_branch_id=config.cache_branch_id)
        self.helper.enable()

    def close(self) -> None:
        self.helper.disable()


class FastCacheAccelerator(Accelerator):
    """fastcache in strict mode: a shape warm-up did not prepare raises instead of compiling."""

    name = "fastcache"

    def __init__(self, pipe: Any, config: ServeConfig) -> None:
        super().__init__(pipe, config)
        import fastcache

        if config.gate_step is not None and pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("--gate-step (TGATE) needs classifier-free guidance, and this model's U-Net embeds "
                             "guidance (time_cond_proj_dim, LCM-style), so it runs without; serve it without --gate-step")
        self.handle = fastcache.accelerate(
            pipe, cache_interval=config.cache_interval, cache_branch_id=config.cache_branch_id,
            gate_step=config.gate_step, compile_backend=config.compile_backend, strict=True,
        )
        self._baseline = 0

    def warm(self, width: int, height: int, batch_size: int, guidance_scale: float) -> None:
        # With --gate-step, warmup's default step count runs TGATE's whole plan: every graph.
        report = self.handle.warmup(height=height, width=width, batch_size=batch_size, guidance_scale=guidance_scale)
        logger.info("warmed %dx%d batch %d in %.1f s: %d graphs compiled, new shapes %s", width, height,
                    batch_size, report.seconds, report.compilations, list(report.new_shapes))

    def warmed(self) -> None:
        self._baseline = self.handle.compilations

    def compilations_since_warmup(self) -> int:
        return self.handle.compilations - self._baseline

    def step_counts(self) -> tuple[int, int] | None:
        return self.handle.stats.refresh_steps, self.handle.stats.cached_steps

    def healthy(self) -> str | None:
        # fastcache restores the pipeline and disables its handle after a compile failure: the
        # pipeline would then serve plain diffusers' images silently.
        return None if self.handle.enabled else "the fastcache handle was disabled (a compile or capture failure)"

    def close(self) -> None:
        self.handle.disable()


ACCELERATORS: dict[str, type[Accelerator]] = {
    "none": Accelerator, "deepcache": DeepCacheAccelerator, "fastcache": FastCacheAccelerator,
}
