"""IP-Adapter image embeddings (``ip_adapter_image_embeds``) and masks (``cross_attention_kwargs=
{"ip_adapter_masks": ...}``) on SD and SDXL (masks also in SD img2img, inpaint and ControlNet),
against DeepCache 0.1.1 and the plain pipeline.

The tiny IP-Adapters are random (built from the U-Net's attention layout, loaded through diffusers'
own `load_ip_adapter`), strong enough that ignoring the image tokens moves the latents far above
the bound. Reference: a twin pipeline with the same adapter running DeepCache's helper, or the
plain twin with caching off.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fastcache.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

from .helpers import accelerated, deepcache_latents, latents, max_diff

TOLERANCE = 1e-5
IMAGE_EMBED_DIM = 32
IP_ADAPTER = "IP-Adapter (ip_adapter_image_embeds, set_ip_adapter_scale)"


def ip_adapter_state_dict(unet: Any, seed: int, tokens: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter for `unet` in the layout diffusers' `load_ip_adapter` reads."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    image_proj = {
        "proj.weight": weight(cross * tokens, IMAGE_EMBED_DIM),
        "proj.bias": torch.zeros(cross * tokens),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_adapter = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attention = unet.get_submodule(name.removesuffix(".processor"))
        hidden = attention.to_q.out_features
        ip_adapter[f"{key_id}.to_k_ip.weight"] = weight(hidden, cross)
        ip_adapter[f"{key_id}.to_v_ip.weight"] = weight(hidden, cross)
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _with_ip_adapter(build: Any) -> Any:
    pipe = build()
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, seed=3), subfolder="", weight_name="", image_encoder_folder=None)
    return pipe


@pytest.fixture(scope="module", params=[
    pytest.param("sd", marks=pytest.mark.covers("StableDiffusionPipeline")),
    pytest.param("sdxl", marks=pytest.mark.covers("StableDiffusionXLPipeline")),
])
def twins(request):
    build = tiny_sd_pipeline if request.param == "sd" else tiny_sdxl_pipeline
    return _with_ip_adapter(build), _with_ip_adapter(build)


def _embeds(seed: int = 0) -> dict[str, Any]:
    """One adapter; classifier-free guidance: (negative, positive) stacked on dim 0."""
    image = torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(seed))
    return {"ip_adapter_image_embeds": [image]}


@pytest.mark.covers(IP_ADAPTER, "= DeepCache")
def test_ip_adapter_matches_deepcache(twins):
    reference, pipe = twins
    with_image = latents(reference, **_embeds())
    other_image = latents(reference, **_embeds(seed=1))
    assert max_diff(with_image, other_image) > 0.01, "the image embeddings must matter in this test"
    for branch in (0, 5):
        expected = deepcache_latents(reference, 3, branch, **_embeds())
        with accelerated(pipe, cache_interval=3, cache_branch_id=branch, compile=False):
            assert max_diff(latents(pipe, **_embeds()), expected) <= TOLERANCE, f"branch {branch}"


@pytest.mark.covers(IP_ADAPTER, "caching off = plain")
@pytest.mark.covers(check="emulated CUDA Graphs")
def test_ip_adapter_caching_off_equals_plain(twins):
    reference, pipe = twins
    with accelerated(pipe, cache_interval=1, compile=False, emulate_graphs=True):
        for seed in (0, 1):  # new embeddings reach the static buffers
            assert max_diff(latents(pipe, **_embeds(seed)), latents(reference, **_embeds(seed))) <= 1e-6


@pytest.mark.covers(IP_ADAPTER, "compiled (dynamo, no graph breaks)")
@pytest.mark.covers(check="emulated CUDA Graphs")
def test_ip_adapter_scale_change_after_accelerate(twins):
    """set_ip_adapter_scale after accelerate is seen by the next call (graphs prepared again)."""
    reference, pipe = twins
    with accelerated(pipe, cache_interval=2, compile_backend="eager", emulate_graphs=True) as handle:
        for scale in (1.0, 0.4):
            reference.set_ip_adapter_scale(scale)
            pipe.set_ip_adapter_scale(scale)
            expected = deepcache_latents(reference, 2, 0, steps=4, **_embeds())
            assert max_diff(latents(pipe, steps=4, **_embeds()), expected) <= TOLERANCE * 10, f"scale {scale}"
        assert handle.compilations == 4
    reference.set_ip_adapter_scale(1.0)
    pipe.set_ip_adapter_scale(1.0)


# -- IP-Adapter masks (cross_attention_kwargs={"ip_adapter_masks": ...}) -------------------------------
# Two adapters: the first with two images, each masked to one half of the image; the second
# unmasked (None), or both with one image and the masks as one (adapters, 1, h, w) tensor, the
# processors' backward-compatible form. Masks move these latents by 7-18, far above the bounds.
IP_MASKS = "IP-Adapter masks (cross_attention_kwargs ip_adapter_masks)"


def _with_two_ip_adapters(build: Any) -> Any:
    pipe = build()
    adapters = [ip_adapter_state_dict(pipe.unet, seed=3), ip_adapter_state_dict(pipe.unet, seed=4)]
    pipe.load_ip_adapter(adapters, subfolder=["", ""], weight_name=["", ""], image_encoder_folder=None)
    return pipe


def _half_masks(images: int, flip: bool = False) -> torch.Tensor:
    """(images, 128, 128): image i covers half i of the picture (left, right), or the other."""
    masks = torch.zeros(images, 128, 128)
    for index in range(images):
        half = (index + flip) % 2
        masks[index, :, 64 * half : 64 * (half + 1)] = 1.0
    return masks


def _masked(form: str, seed: int = 0, flip: bool = False) -> dict[str, Any]:
    """Call arguments: image embeddings for both adapters and their masks in `form`."""
    generator = torch.Generator().manual_seed(seed)
    if form == "list":  # adapter 0: two images, one mask each, (1, 2, h, w); adapter 1 unmasked
        embeds = [torch.randn(2, images, IMAGE_EMBED_DIM, generator=generator) for images in (2, 1)]
        masks: Any = [_half_masks(2, flip).unsqueeze(0), None]
    else:  # "tensor": one image per adapter, masks (adapters, 1, h, w)
        embeds = [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=generator) for _ in range(2)]
        masks = _half_masks(2, flip).unsqueeze(1)
    return {"ip_adapter_image_embeds": embeds, "cross_attention_kwargs": {"ip_adapter_masks": masks}}


@pytest.fixture(scope="module", params=[
    pytest.param("sd", marks=pytest.mark.covers("StableDiffusionPipeline")),
    pytest.param("sdxl", marks=pytest.mark.covers("StableDiffusionXLPipeline")),
])
def masked_pipe(request):
    return _with_two_ip_adapters(tiny_sd_pipeline if request.param == "sd" else tiny_sdxl_pipeline)


def test_ip_adapter_masks_matter(masked_pipe):
    """Guards the tests below: the masks, and which half each covers, move the latents far."""
    masked = latents(masked_pipe, **_masked("list"))
    unmasked = latents(masked_pipe, ip_adapter_image_embeds=_masked("list")["ip_adapter_image_embeds"])
    flipped = latents(masked_pipe, **_masked("list", flip=True))
    assert max_diff(masked, unmasked) > 0.1 and max_diff(masked, flipped) > 0.1


@pytest.mark.covers(IP_MASKS, "caching off = plain")
@pytest.mark.parametrize("form", ["list", "tensor"])
def test_ip_adapter_masks_caching_off_equals_plain(masked_pipe, form):
    expected = latents(masked_pipe, **_masked(form))
    with accelerated(masked_pipe, cache_interval=1, compile=False):
        assert max_diff(latents(masked_pipe, **_masked(form)), expected) <= 1e-6


@pytest.mark.covers(IP_MASKS, "caching off = plain")
@pytest.mark.covers(IP_MASKS, "emulated CUDA Graphs")
def test_ip_adapter_masks_reach_the_graphs_static_buffers(masked_pipe):
    """Recorded graph replay (emulated CUDA Graphs): each call's masks are copied into the static
    buffers, so a second call with other masks at the same shapes gets its own result."""
    expected = {flip: latents(masked_pipe, steps=4, **_masked("list", flip=flip)) for flip in (False, True)}
    with accelerated(masked_pipe, cache_interval=1, compile=False, emulate_graphs=True) as handle:
        for flip in (False, True):
            assert max_diff(latents(masked_pipe, steps=4, **_masked("list", flip=flip)), expected[flip]) <= 1e-6, flip
        assert handle._runner.captures == 1  # one shape: the second call replayed the first capture


@pytest.mark.covers(IP_MASKS, "= DeepCache")
@pytest.mark.parametrize("form", ["list", "tensor"])
def test_ip_adapter_masks_match_deepcache(masked_pipe, form):
    call = _masked(form)
    for branch in (0, 5):
        expected = deepcache_latents(masked_pipe, 3, branch, **call)
        with accelerated(masked_pipe, cache_interval=3, cache_branch_id=branch, compile=False) as handle:
            assert max_diff(latents(masked_pipe, **call), expected) <= TOLERANCE, f"branch {branch}"
        assert handle.stats.cached_steps > 0


@pytest.mark.covers(IP_MASKS, "compiled (dynamo, no graph breaks)")
@pytest.mark.covers(IP_MASKS, "emulated CUDA Graphs")
def test_ip_adapter_masks_through_dynamo_and_emulated_graphs(masked_pipe):
    """Masks are graph inputs: new masks at the same shapes replay the same graphs; an adapter
    switching between masked and unmasked is another shape key (its graphs prepared once)."""
    calls = [_masked("list"), _masked("list", flip=True), _masked("list", seed=1)]
    unmasked_second = _masked("list")
    unmasked_second["cross_attention_kwargs"] = {"ip_adapter_masks": [None, None]}
    expected = [deepcache_latents(masked_pipe, 2, 0, steps=4, **call) for call in calls + [unmasked_second]]
    with accelerated(masked_pipe, cache_interval=2, compile_backend="eager", emulate_graphs=True) as handle:
        for index, call in enumerate(calls):
            assert max_diff(latents(masked_pipe, steps=4, **call), expected[index]) <= TOLERANCE * 10, f"call {index}"
        assert handle.compilations == 2  # full and shallow, once
        assert max_diff(latents(masked_pipe, steps=4, **unmasked_second), expected[3]) <= TOLERANCE * 10
        assert handle.compilations == 4


def _ip_masked_pipeline(kind: str) -> tuple[Any, dict[str, Any]]:
    """A tiny SD img2img, inpaint or ControlNet pipeline with the two adapters, and its call."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    from .helpers import controlnet_pipeline

    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    if kind == "controlnet":
        pipe = controlnet_pipeline("sd")
        call = dict(pipe.control_kwargs)
    elif kind == "img2img":
        pipe = tiny_sd_pipeline(pipeline_class=StableDiffusionImg2ImgPipeline)
        call = dict(image=image, strength=0.8)
    else:
        pipe = tiny_sd_pipeline(pipeline_class=StableDiffusionInpaintPipeline, in_channels=9)
        call = dict(image=image, mask_image=_half_masks(1)[None], strength=1.0)
    adapters = [ip_adapter_state_dict(pipe.unet, seed=3), ip_adapter_state_dict(pipe.unet, seed=4)]
    pipe.load_ip_adapter(adapters, subfolder=["", ""], weight_name=["", ""], image_encoder_folder=None)
    return pipe, {**call, **_masked("list")}


@pytest.mark.covers(IP_MASKS, "caching off = plain")
@pytest.mark.covers(IP_MASKS, "= DeepCache")
@pytest.mark.parametrize("kind", [
    pytest.param("img2img", marks=pytest.mark.covers("StableDiffusionImg2ImgPipeline")),
    pytest.param("inpaint", marks=pytest.mark.covers("StableDiffusionInpaintPipeline (9-channel U-Net)")),
    pytest.param("controlnet", marks=pytest.mark.covers("StableDiffusionControlNetPipeline")),
])
def test_ip_adapter_masks_in_img2img_inpaint_and_controlnet(kind):
    pipe, call = _ip_masked_pipeline(kind)
    plain = latents(pipe, **call)
    with accelerated(pipe, cache_interval=1, compile=False):
        assert max_diff(latents(pipe, **call), plain) <= 1e-6, "caching off"
    expected = deepcache_latents(pipe, 3, 0, **call)
    with accelerated(pipe, cache_interval=3, compile=False):
        assert max_diff(latents(pipe, **call), expected) <= TOLERANCE, "caching on"
    assert max_diff(expected, plain) > 1e-3, "caching must change the output"


def test_malformed_ip_adapter_masks_raise_before_any_graph(sd_pipe):
    """A mask that is not a 4-D tensor raises ValueError as diffusers' processors do (no compile
    error, the pipeline stays accelerated); masks None are no masks (the plain pipeline's output)."""
    plain = latents(sd_pipe, steps=2)
    with accelerated(sd_pipe, cache_interval=1, compile=False) as handle:
        sample = torch.zeros(2, 4, 16, 16)
        with pytest.raises(ValueError, match="ip_adapter_masks"):
            sd_pipe.unet(sample, 10, torch.zeros(2, 77, 32),
                         cross_attention_kwargs={"ip_adapter_masks": [torch.ones(8, 8)]})
        assert handle.enabled
        unmasked = latents(sd_pipe, steps=2, cross_attention_kwargs={"ip_adapter_masks": None})
    assert max_diff(unmasked, plain) <= 1e-6
