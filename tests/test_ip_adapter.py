"""IP-Adapter image embeddings (``ip_adapter_image_embeds``) on SD and SDXL, against DeepCache 0.1.1.

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
