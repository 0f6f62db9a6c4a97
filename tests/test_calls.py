"""Pipeline calls and custom loops: state never goes stale between calls (back to back, img2img
strength, another scheduler, dtype moves), direct U-Net calls, model checks, warm-up."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

import fastcache
from fastcache.errors import (
    InvalidConfigError,
    UnsupportedInputError,
    UnsupportedPipelineError,
)

from .helpers import accelerated, assert_untouched, deepcache_latents, latents, max_diff


def _back_to_back_calls():
    return [
        dict(),
        dict(height=64, width=96),
        dict(num_images_per_prompt=2),
        dict(guidance_scale=1.0),  # no classifier-free guidance: the U-Net batch halves
        dict(),
    ]


@pytest.mark.parametrize("options", [dict(compile=False), dict(compile=False, emulate_graphs=True)],
                         ids=["eager", "emulated-graphs"])
def test_back_to_back_calls_equal_fresh_accelerations(sd_pipe, options):
    fresh = []
    for call in _back_to_back_calls():
        with accelerated(sd_pipe, cache_interval=3, cache_branch_id=2, **options):
            fresh.append(latents(sd_pipe, seed=1, **call))
    with accelerated(sd_pipe, cache_interval=3, cache_branch_id=2, **options) as handle:
        for call, expected in zip(_back_to_back_calls(), fresh):
            actual = latents(sd_pipe, seed=1, **call)
            assert max_diff(actual, expected) <= 1e-6, call
            assert handle.stats.last_call[0] is True
    assert handle.stats.pipeline_calls == len(fresh)


def test_img2img_strength_changes_equal_fresh_accelerations(sd_pipe):
    img2img = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    strengths = [0.5, 0.8, 0.3, 0.8]
    fresh = []
    for strength in strengths:
        with accelerated(img2img, cache_interval=2, compile=False, emulate_graphs=True):
            fresh.append(latents(img2img, seed=2, image=image, strength=strength))
    with accelerated(img2img, cache_interval=2, compile=False, emulate_graphs=True) as handle:
        for strength, expected in zip(strengths, fresh):
            assert max_diff(latents(img2img, seed=2, image=image, strength=strength), expected) <= 1e-6
            assert handle.stats.last_call[0] is True
            assert len(handle.stats.last_call) == int(10 * strength)
    assert_untouched(img2img)


def test_calls_outside_the_pipeline_warn_once(sd_pipe, caplog):
    with accelerated(sd_pipe, compile=False) as handle:
        with caplog.at_level(logging.WARNING, logger="fastcache"):
            for _ in range(3):
                sd_pipe.unet(torch.zeros(2, 4, 16, 16), 10, torch.zeros(2, 77, 32))
        assert caplog.text.count("outside the accelerated pipeline") == 1
    caplog.clear()
    with accelerated(sd_pipe, cache_interval=2, compile=False) as handle:  # a custom loop that re-arms
        with caplog.at_level(logging.WARNING, logger="fastcache"):
            handle.reset()
            for _ in range(3):
                sd_pipe.unet(torch.zeros(2, 4, 16, 16), 10, torch.zeros(2, 77, 32))
        assert caplog.text == "" and handle.stats.last_call == [True, False, True]


def test_custom_loops_check_the_model_every_call_until_reset_then_at_reset(sd_pipe, monkeypatch):
    """A model change (here a weight given new storage) is noticed by the next direct U-Net call
    of a loop that never called reset(); once reset() is used, it is noticed there and the
    per-call fingerprint (0.65 ms for SD 1.5's U-Net) leaves the steps."""
    accelerate_module = importlib.import_module("fastcache.model_change")  # where the handle fingerprints
    checks: list[int] = []
    fingerprint = accelerate_module.model_fingerprint
    monkeypatch.setattr(accelerate_module, "model_fingerprint", lambda model: checks.append(1) or fingerprint(model))
    weight = sd_pipe.unet.conv_out.weight
    original = weight.data
    args = (torch.zeros(2, 4, 16, 16), 10, torch.zeros(2, 77, 32))
    try:
        with accelerated(sd_pipe, cache_interval=2, compile=False) as handle:
            runner = handle._runner
            weight.data = original.clone()
            sd_pipe.unet(*args)
            assert handle._runner is not runner, "an unmanaged loop must notice the new storage at once"
            handle.reset()
            checks.clear()
            for _ in range(3):
                sd_pipe.unet(*args)
            assert checks == [], "after reset(), direct calls must not fingerprint the model"
            runner = handle._runner
            weight.data = original.clone()
            handle.reset()
            assert handle._runner is not runner, "reset() must notice the new storage"
            refreshes = handle.stats.refresh_steps
            sd_pipe.unet(*args)
            assert handle.stats.refresh_steps == refreshes + 1, "the first call after reset() refreshes"
    finally:
        weight.data = original


def test_runtime_names_the_runner(sd_pipe):
    for options, name in ((dict(compile=False), "eager"), (dict(), "compiled"),
                          (dict(compile=False, emulate_graphs=True), "emulated-graphs")):
        with accelerated(sd_pipe, **options) as handle:
            assert handle.runtime == name


def test_warmup_follows_the_serving_call_arguments(sd_pipe):
    """Shapes come from the call: no CFG halves the U-Net batch; prompt embeddings replace the prompt."""
    embeddings, _ = sd_pipe.encode_prompt("a cat", "cpu", 1, False)
    with accelerated(sd_pipe, cache_interval=3, compile=False) as handle:
        report = handle.warmup(batch_size=2, guidance_scale=1.0, prompt_embeds=embeddings.repeat(1, 1, 1))
        assert report.new_shapes == ("batch 2, latents 4x16x16, float32 on cpu",)
        assert handle.stats.last_call == [True, False, False]
    with accelerated(sd_pipe, cache_interval=1, compile=False) as handle:
        handle.warmup(height=64, width=64)
        assert handle.stats.last_call == [True, True, True]


def test_warmup_of_several_shapes_prepares_them_largest_first_in_one_report(two_level_pipe):
    """warmup(shapes=...) captures the largest shape first (its pool serves the smaller ones) and
    reports every shape it prepared; strict serving then compiles nothing at any of them, and
    each call gives the images of a call accelerated afresh at that shape."""
    shapes = [(64, 64, 1), (128, 128, 2), (64, 96, 1)]
    expected = {}
    for height, width, batch in shapes:
        with accelerated(two_level_pipe, cache_interval=3, compile=False):
            expected[height, width] = latents(two_level_pipe, height=height, width=width, num_images_per_prompt=batch)
    with accelerated(two_level_pipe, cache_interval=3, compile_backend="eager", emulate_graphs=True, strict=True) as handle:
        report = handle.warmup(shapes=shapes)
        assert report.new_shapes and sorted(report.new_shapes) == sorted([
            "batch 2, latents 4x8x8, float32 on cpu", "batch 4, latents 4x16x16, float32 on cpu",
            "batch 2, latents 4x8x12, float32 on cpu"])
        assert report.compilations == 6  # full and shallow at each shape
        captured = [key for key in handle._runner._shapes]  # capture order
        assert [dict((n, s) for n, s, _ in key[1:])["sample"] for key in captured] == [
            (4, 4, 16, 16), (2, 4, 8, 12), (2, 4, 8, 8)]
        for height, width, batch in shapes:
            actual = latents(two_level_pipe, height=height, width=width, num_images_per_prompt=batch)
            assert max_diff(actual, expected[height, width]) <= 1e-5
        assert handle.compilations == 6
        with pytest.raises(InvalidConfigError, match="not both"):
            handle.warmup(height=64, shapes=shapes)


def test_changing_the_scheduler_between_calls_equals_fresh_accelerations(sd_pipe):
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    original = sd_pipe.scheduler
    schedulers = [original, EulerDiscreteScheduler.from_config(original.config),
                  HeunDiscreteScheduler.from_config(original.config), original]
    try:
        fresh = []
        for scheduler in schedulers:
            sd_pipe.scheduler = scheduler
            with accelerated(sd_pipe, cache_interval=3, compile=False):
                fresh.append(latents(sd_pipe, steps=6))
        with accelerated(sd_pipe, cache_interval=3, compile=False) as handle:
            for scheduler, expected in zip(schedulers, fresh):
                sd_pipe.scheduler = scheduler
                assert max_diff(latents(sd_pipe, steps=6), expected) <= 1e-6, type(scheduler).__name__
                assert handle.stats.last_call[0] is True
    finally:
        sd_pipe.scheduler = original


def test_pipe_to_another_dtype_after_accelerate(sd_pipe):
    """New dtype, new shape key: graphs are prepared again and results follow the moved pipeline."""
    try:
        with accelerated(sd_pipe, cache_interval=3, compile=False, emulate_graphs=True) as handle:
            latents(sd_pipe, steps=4)
            sd_pipe.to(torch.float64)
            actual = latents(sd_pipe, steps=4)
            # The weights' new storage is noticed: a new runner captured both graphs (the old freed).
            assert actual.dtype == torch.float64 and handle._runner.captures == 2
        expected = deepcache_latents(sd_pipe, 3, 0, steps=4)
        assert max_diff(actual, expected) <= 1e-12
    finally:
        sd_pipe.to(torch.float32)


def test_model_offload_is_refused_clearly(sd_pipe):
    """accelerate's offload hooks replace forward; fastcache refuses rather than risk wrong images."""
    sd_pipe.unet._hf_hook = object()
    try:
        with pytest.raises(UnsupportedPipelineError, match="offload"):
            fastcache.accelerate(sd_pipe, compile=False)
    finally:
        del sd_pipe.unet._hf_hook
    with accelerated(sd_pipe, compile=False):
        sd_pipe.unet._hf_hook = object()
        try:
            with pytest.raises(UnsupportedInputError, match="offload"):
                latents(sd_pipe, steps=2)
        finally:
            del sd_pipe.unet._hf_hook


def test_the_handle_says_what_it_runs(sd_pipe):
    img2img = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    with accelerated(sd_pipe, cache_interval=2, cache_branch_id=1, compile=False) as handle:
        handle.attach(img2img)
        handle.warmup(height=128, width=128)
        assert repr(handle) == (
            "FastCache(StableDiffusionPipeline + StableDiffusionImg2ImgPipeline, cache_interval=2, "
            "cache_branch_id=1, runtime='eager', shapes=['batch 2, latents 4x16x16, float32 on cpu'], enabled=True)"
        )
