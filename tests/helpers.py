"""Test helpers: running tiny pipelines, the DeepCache 0.1.1 reference, comparisons."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import threading
from typing import Any, Callable, Iterator

import numpy as np
import torch

import fastcache

STEPS = 10
PROMPT = "a photo of an astronaut on the moon"


def latents(pipe: Any, seed: int = 0, steps: int = STEPS, **kwargs: Any) -> torch.Tensor:
    """Final latents of one pipeline call with a fixed generator."""
    kwargs.setdefault("prompt", PROMPT)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(num_inference_steps=steps, generator=generator, output_type="latent", **kwargs).images


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """max |actual - expected| <= rtol * max |expected| (latents are O(1..50) here)."""
    bound = rtol * expected.abs().max().item()
    diff = max_diff(actual, expected)
    assert diff <= bound, f"max abs difference {diff:.3g} > {bound:.3g} ({rtol} x max |expected|)"


def assert_untouched(pipe: Any) -> None:
    """The pipeline carries no trace of fastcache or DeepCache."""
    from fastcache.model_watch import WATCHED_METHODS

    assert getattr(type(pipe), "_fastcache_handle", None) is None, "pipeline class still swapped"
    forward = vars(pipe.unet).get("forward")
    assert forward is None or forward == type(pipe.unet).forward.__get__(pipe.unet), "unet.forward still patched"
    left = sorted(set(WATCHED_METHODS) & set(vars(pipe.unet)))
    assert not left, f"the model watch's wrappers are still on the U-Net: {left}"


@contextlib.contextmanager
def accelerated(pipe: Any, **options: Any) -> Iterator[fastcache.FastCache]:
    handle = fastcache.accelerate(pipe, **options)
    try:
        yield handle
    finally:
        handle.disable()


def deepcache_latents(pipe: Any, interval: int, branch: int, helper_class: Any = None, **kwargs: Any) -> torch.Tensor:
    """Latents from the DeepCache 0.1.1 package's own helper (the ground truth)."""
    from DeepCache import DeepCacheSDHelper

    helper = (helper_class or DeepCacheSDHelper)(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return latents(pipe, **kwargs)
    finally:
        helper.disable()


def deepcache_helper_with_schedule(is_refresh: Callable[[int], bool]) -> type:
    """DeepCache's helper (its module wrapping, unchanged) with another refresh rule.

    DeepCache's helper only implements the uniform schedule; this swaps in `is_refresh(step)` for
    its ``(cur - start) % interval == 0`` test, so non-uniform schedules can be checked against
    DeepCache's mechanism.
    """
    from DeepCache import DeepCacheSDHelper

    class ScheduledHelper(DeepCacheSDHelper):
        def set_params(self, *args: Any, **kwargs: Any) -> None:
            super().set_params(*args, **kwargs)
            self.params["skip_mode"] = "scheduled"  # disables DeepCache's own uniform test

        def is_skip_step(self, block_i: int, layer_i: int, blocktype: str = "down") -> bool:
            self.start_timestep = self.cur_timestep if self.start_timestep is None else self.start_timestep
            if is_refresh(self.cur_timestep - self.start_timestep):
                return False
            return super().is_skip_step(block_i, layer_i, blocktype)

    return ScheduledHelper


def deepcache_quad_center() -> Callable[..., Any]:
    """DeepCache 0.1.1's ``sample_from_quad_center``, loaded from the installed package's source.

    Its module imports diffusers internals that newer diffusers lack, so the function alone is
    read out of the file and executed with numpy.
    """
    spec = importlib.util.find_spec("DeepCache")
    assert spec is not None and spec.origin is not None
    path = os.path.join(os.path.dirname(spec.origin), "sd", "pipeline_stable_diffusion.py")
    with open(path) as handle:
        tree = ast.parse(handle.read())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    namespace: dict[str, Any] = {"np": np}
    exec(compile(ast.Module([function], []), path, "exec"), namespace)
    return namespace["sample_from_quad_center"]


def control_image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def controlnet_pipeline(kind: str) -> Any:
    """A tiny ControlNet pipeline: "sd", "sdxl" or "sd-multi" (two ControlNets), with the call's
    control images in ``pipe.control_kwargs``. The ControlNets' output convolutions are random."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    from fastcache.tiny import tiny_controlnet, tiny_sd_pipeline, tiny_sdxl_pipeline

    base = tiny_sdxl_pipeline() if kind == "sdxl" else tiny_sd_pipeline()
    pipeline_class = StableDiffusionXLControlNetPipeline if kind == "sdxl" else StableDiffusionControlNetPipeline
    if kind == "sd-multi":
        controlnet: Any = [tiny_controlnet(base.unet, seed=1), tiny_controlnet(base.unet, seed=2)]
    else:
        controlnet = tiny_controlnet(base.unet)
    pipe = pipeline_class(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    pipe.control_kwargs = (
        dict(image=[control_image(1), control_image(2)]) if kind == "sd-multi" else dict(image=control_image())
    )
    return pipe


class Worker(threading.Thread):
    """Runs `target` on a thread of its own, keeping its result or exception for `outcome()`."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self._work, self._result, self._error = target, None, None
        self.start()

    def run(self):
        try:
            self._result = self._work()
        except BaseException as error:  # noqa: BLE001 (raised again by outcome())
            self._error = error

    def outcome(self, timeout=600):
        self.join(timeout)
        assert not self.is_alive(), "the thread is still running"
        if self._error is not None:
            raise self._error
        return self._result
