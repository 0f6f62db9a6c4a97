"""ControlNet pipelines (SD, SDXL, multi-ControlNet) against DeepCache 0.1.1.

DeepCache's helper supports ControlNet implicitly: the U-Net adds the residuals to its skip
connections (cached or not) and to the mid block's output, so the live shallow branch gets fresh
residuals on cached steps, and the deepest branch a fresh mid residual. fastcache must match it.
The tiny ControlNets have random (not zero) output convolutions, so their residuals move the
latents by 3-6 and a residual applied wrongly would fail the 1e-5 bound.
"""

from __future__ import annotations

import pytest

from fastcache.unet_split import unet_layout

from .helpers import accelerated, controlnet_pipeline, deepcache_latents, latents, max_diff

TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=[
    pytest.param("sd", marks=pytest.mark.covers("StableDiffusionControlNetPipeline")),
    pytest.param("sdxl", marks=pytest.mark.covers("StableDiffusionXLControlNetPipeline")),
    pytest.param("sd-multi", marks=pytest.mark.covers("StableDiffusionControlNetPipeline (multi-ControlNet)")),
])
def controlnet_pipe(request):
    return controlnet_pipeline(request.param)


def test_controlnet_matters(controlnet_pipe):
    with_control = latents(controlnet_pipe, **controlnet_pipe.control_kwargs)
    scale = [0.0, 0.0] if isinstance(controlnet_pipe.control_kwargs["image"], list) else 0.0
    without = latents(controlnet_pipe, controlnet_conditioning_scale=scale, **controlnet_pipe.control_kwargs)
    assert max_diff(with_control, without) > 0.1


@pytest.mark.covers(check="= DeepCache")
def test_every_branch_matches_deepcache(controlnet_pipe):
    call = controlnet_pipe.control_kwargs
    for branch in range(unet_layout(controlnet_pipe.unet).num_branches):
        expected = deepcache_latents(controlnet_pipe, 3, branch, **call)
        with accelerated(controlnet_pipe, cache_interval=3, cache_branch_id=branch, compile=False):
            actual = latents(controlnet_pipe, **call)
        assert max_diff(actual, expected) <= TOLERANCE, f"branch {branch}"


@pytest.mark.covers(check="caching off = plain")
def test_caching_off_equals_plain(controlnet_pipe):
    call = controlnet_pipe.control_kwargs
    expected = latents(controlnet_pipe, **call)
    with accelerated(controlnet_pipe, cache_interval=1, compile=False):
        assert max_diff(latents(controlnet_pipe, **call), expected) <= 1e-6


@pytest.mark.covers(check="emulated CUDA Graphs")
@pytest.mark.covers(check="compiled (dynamo, no graph breaks)")
def test_residuals_through_graphs_and_dynamo(controlnet_pipe):
    """Residuals are static graph inputs (emulated replay) and trace without graph breaks."""
    call = controlnet_pipe.control_kwargs
    deepest = unet_layout(controlnet_pipe.unet).num_branches - 1
    for branch in (0, deepest):
        expected = deepcache_latents(controlnet_pipe, 2, branch, **call)
        with accelerated(controlnet_pipe, cache_interval=2, cache_branch_id=branch, compile=False, emulate_graphs=True):
            assert max_diff(latents(controlnet_pipe, **call), expected) <= TOLERANCE
    expected = deepcache_latents(controlnet_pipe, 2, 0, steps=4, **call)
    with accelerated(controlnet_pipe, cache_interval=2, cache_branch_id=0, compile_backend="eager"):
        assert max_diff(latents(controlnet_pipe, steps=4, **call), expected) <= TOLERANCE
