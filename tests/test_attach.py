"""Pipelines sharing one U-Net (attach) and a U-Net replaced after accelerate."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

import fastcache
from fastcache.errors import (
    AlreadyAcceleratedError,
    UnsupportedPipelineError,
)

from .helpers import accelerated, assert_untouched, deepcache_latents, latents, max_diff



ATTACH_IMAGE = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))


def _img2img_latents(pipe, seed=0):
    return latents(pipe, seed=seed, image=ATTACH_IMAGE, strength=0.7)


@pytest.mark.covers("attach(): a second pipeline sharing the U-Net (from_pipe)", "= DeepCache")
@pytest.mark.covers("attach(): a second pipeline sharing the U-Net (from_pipe)", "emulated CUDA Graphs")
def test_attached_pipeline_shares_graphs_and_re_arms_at_its_calls(any_pipe):
    """A text-to-image and an img2img pipeline on one U-Net, calls interleaved: each equals
    DeepCache's helper on that pipeline alone, and the img2img calls reuse the shape's graphs."""
    from diffusers import AutoPipelineForImage2Image

    sd_pipe = any_pipe
    img2img = AutoPipelineForImage2Image.from_pipe(sd_pipe)
    assert img2img.unet is sd_pipe.unet
    expected_text = deepcache_latents(sd_pipe, 3, 0)
    expected_image = deepcache_latents(img2img, 3, 0, image=ATTACH_IMAGE, strength=0.7)
    with accelerated(sd_pipe, cache_interval=3, compile=False, emulate_graphs=True) as handle:
        with pytest.raises(AlreadyAcceleratedError, match=r"handle\.attach\(pipe\)"):
            fastcache.accelerate(img2img)
        handle.attach(img2img)
        assert max_diff(latents(sd_pipe), expected_text) <= 1e-5
        captures = handle._runner.captures
        for _ in range(2):  # the second time, its first step must refresh again
            assert max_diff(_img2img_latents(img2img), expected_image) <= 1e-5
            assert handle.stats.last_call == [step % 3 == 0 for step in range(7)]
        assert handle._runner.captures == captures, "img2img at the same shape captured new graphs"
        assert max_diff(latents(sd_pipe), expected_text) <= 1e-5
    assert_untouched(img2img)
    assert_untouched(sd_pipe)


def test_attach_refuses_what_it_cannot_share(sd_pipe):
    own_unet = StableDiffusionImg2ImgPipeline(**{**sd_pipe.components, "unet": copy.deepcopy(sd_pipe.unet)})
    with accelerated(sd_pipe, compile=False) as handle:
        with pytest.raises(UnsupportedPipelineError, match="shares this handle's U-Net"):
            handle.attach(own_unet)
        with pytest.raises(UnsupportedPipelineError, match="cannot be deep-copied"):
            copy.deepcopy(sd_pipe.unet)
        with pytest.raises(AlreadyAcceleratedError, match="already accelerated"):
            handle.attach(sd_pipe)
        other = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
        handle.attach(other)
        with pytest.raises(AlreadyAcceleratedError, match="already accelerated"):
            handle.attach(other)
    assert_untouched(other)


def test_a_unet_replaced_after_accelerate_is_accelerated_at_the_call(sd_pipe):
    """The next call accelerates the new U-Net (issue 13 item 8; it was refused before), with the
    images of accelerating it afresh; the previous U-Net gets its own forward back."""
    original, replacement = sd_pipe.unet, copy.deepcopy(sd_pipe.unet)
    with torch.no_grad():
        replacement.conv_out.weight.mul_(0.5)  # a "fine-tune"
    try:
        sd_pipe.unet = replacement
        with accelerated(sd_pipe, compile=False):
            expected = latents(sd_pipe, steps=3)
        sd_pipe.unet = original
        with accelerated(sd_pipe, compile=False):
            latents(sd_pipe, steps=3)
            sd_pipe.unet = replacement
            assert torch.equal(latents(sd_pipe, steps=3), expected)
            assert vars(original).get("forward") in (None, type(original).forward.__get__(original))
        assert_untouched(sd_pipe)
    finally:
        sd_pipe.unet = original
    assert_untouched(sd_pipe)
