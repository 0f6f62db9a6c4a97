"""The split against diffusers' own UNet2DConditionModel.forward (eager, exact)."""

from __future__ import annotations

import re

import pytest
import torch

from fastcache.errors import InvalidConfigError, UnsupportedPipelineError
from fastcache.tiny import tiny_sd_unet, tiny_sdxl_unet
from fastcache.unet_split import UNetSplit, unet_layout


def _inputs(unet, batch=2, size=(16, 16), seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *size, generator=generator)
    context = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=generator)
    added = {}
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(batch, 32, generator=generator), "time_ids": torch.randn(batch, 6, generator=generator)}
    return sample, context, added


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def unet(request):
    torch.manual_seed(0)
    return (tiny_sd_unet() if request.param == "sd" else tiny_sdxl_unet()).eval()


@pytest.mark.parametrize("size", [(16, 16), (8, 12)], ids=["16x16", "8x12-odd-upsample"])
@torch.no_grad()
def test_full_equals_unet_forward_bitwise_for_every_branch(unet, size):
    sample, context, added = _inputs(unet, size=size)
    expected = unet(sample, torch.tensor(500), context, added_cond_kwargs=added or None).sample
    timestep = torch.full((sample.shape[0],), 500.0)
    for branch in range(unet_layout(unet).num_branches):
        noise, kept = UNetSplit(unet, branch).full(sample, timestep, context, added)
        assert torch.equal(noise, expected), f"branch {branch}"
        assert kept.shape[0] == sample.shape[0]


@torch.no_grad()
def test_shallow_on_features_of_the_same_step_reproduces_full(unet):
    """With kept features from the same inputs, the shallow path recomputes the full output."""
    sample, context, added = _inputs(unet)
    timestep = torch.full((sample.shape[0],), 321.0)
    for branch in range(unet_layout(unet).num_branches):
        split = UNetSplit(unet, branch)
        noise, kept = split.full(sample, timestep, context, added)
        assert torch.equal(split.shallow(sample, timestep, context, added, kept), noise), f"branch {branch}"


@torch.no_grad()
def test_shallow_does_not_run_the_deep_path(unet):
    """Every module deeper than the branch stays idle on a cached step; shallower ones all run."""
    sample, context, added = _inputs(unet)
    timestep = torch.full((sample.shape[0],), 100.0)
    layout = unet_layout(unet)
    for branch in (0, layout.num_branches - 1):
        split = UNetSplit(unet, branch)
        _, kept = split.full(sample, timestep, context, added)
        ran = set()
        hooks = [
            module.register_forward_hook(lambda m, i, o, name=name: ran.add(name))
            for name, module in unet.named_modules()
            if re.fullmatch(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(resnets|attentions)\.\d+", name)
        ]
        try:
            split.shallow(sample, timestep, context, added, kept)
        finally:
            for hook in hooks:
                hook.remove()
        assert ran, "hooks did not fire"
        assert not any(n.startswith("mid_block") for n in ran)
        block, layer = split.point.block, split.point.layer
        for level in range(layout.num_levels):
            for index in range(layout.layers_per_block):
                expected = level < block or (level == block and index < layer)
                assert (f"down_blocks.{level}.resnets.{index}" in ran) == expected, (branch, level, index)
            up = layout.num_levels - 1 - level
            for position in range(layout.layers_per_block + 1):
                up_layer = layout.layers_per_block - position
                expected = level < block or (level == block and up_layer <= layer)
                assert (f"up_blocks.{up}.resnets.{position}" in ran) == expected, (branch, level, position)


def test_branch_numbering_follows_deepcache():
    layout = unet_layout(tiny_sd_unet())
    assert (layout.num_levels, layout.layers_per_block, layout.num_branches) == (4, 2, 12)
    assert [(p.block, p.layer) for p in map(layout.branch, (0, 1, 2, 3, 11))] == [(0, 0), (0, 1), (0, 2), (1, 0), (3, 2)]
    assert unet_layout(tiny_sdxl_unet()).num_branches == 9


@pytest.mark.parametrize("bad", [-1, 12, 100, 1.0, True])
def test_branch_out_of_range_names_the_valid_range(bad):
    with pytest.raises(InvalidConfigError, match=r"0\.\.11" if isinstance(bad, int) and not isinstance(bad, bool) else "int"):
        UNetSplit(tiny_sd_unet(), bad)


def test_real_architectures_have_deepcache_branch_counts():
    """SD1.5 (12 branches) and SDXL (9), from the configs in bench/, built on the meta device."""
    from diffusers import UNet2DConditionModel

    from bench.configs import unet_config

    for preset, count in (("sd15", 12), ("sd21", 12), ("sdxl", 9)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_config(preset))
        assert unet_layout(unet).num_branches == count, preset


def test_unsupported_unets_are_refused_with_the_reason():
    from diffusers import UNet2DConditionModel

    with pytest.raises(UnsupportedPipelineError, match="class embeddings"):
        unet_layout(UNet2DConditionModel(
            block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
            num_class_embeds=3, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ))
    with pytest.raises(UnsupportedPipelineError, match="SimpleCrossAttnDownBlock2D"):
        unet_layout(UNet2DConditionModel(
            block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
            attention_head_dim=4, down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
        ))
    with pytest.raises(UnsupportedPipelineError, match="symmetric"):
        unet_layout(UNet2DConditionModel(
            block_out_channels=(8, 8), layers_per_block=(1, 2), norm_num_groups=4, cross_attention_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ))
    with pytest.raises(UnsupportedPipelineError, match="UNet2DConditionModel"):
        unet_layout(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_lcm_timestep_cond_and_time_embedding_options_are_followed():
    """``timestep_cond`` (LCM), a time-embedding activation and centred input reach the split like forward."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), time_cond_proj_dim=6,
        time_embedding_act_fn="silu", center_input_sample=True,
    ).eval()
    sample = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 5, 8)
    condition = torch.randn(2, 6)
    expected = unet(sample, 10, context, timestep_cond=condition).sample
    for branch in range(unet_layout(unet).num_branches):
        noise, _ = UNetSplit(unet, branch).full(sample, torch.full((2,), 10.0), context, {"timestep_cond": condition})
        assert torch.equal(noise, expected), branch
