"""bench/profile.py: kernel categories, and the region profile of a real (tiny) pipeline call."""

from __future__ import annotations

import pytest
import torch

from bench.methods import Eager, Shape
from bench.profile import CATEGORIES, category, labelled_regions, profile_method
from bench.workload import Workload
from fastcache.tiny import tiny_sd_pipeline

# Real kernel and op names (CUDA kernels from H100 traces of SD U-Nets, CPU aten ops) by hand.
KNOWN = {
    "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off": "gemm",
    "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
    "void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_256x128_32x3_tn_align8>": "gemm",
    "triton_tem_fused_mm_3": "gemm",
    "aten::addmm": "gemm",
    "aten::mkldnn_convolution": "convolution",
    "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "triton_red_fused_native_group_norm_0": "normalisation",
    "triton_per_fused_native_layer_norm_7": "normalisation",
    "Memcpy HtoD (Pageable -> Device)": "copies",
    "aten::copy_": "copies",
    "triton_poi_fused_cat_5": "copies",
    "triton_poi_fused_add_silu_1": "other",
    "triton_poi_fused__to_copy_convert_element_type_2": "copies",
    # Inductor kernels carrying an extern convolution's or GEMM's epilogue are not convolutions.
    "triton_red_fused_convolution_native_group_norm_1": "normalisation",
    "triton_poi_fused_add_convolution_div_3": "other",
    "triton_poi_fused_addmm_gelu_4": "other",
    "triton_tem_fused_convolution_2": "convolution",
    "aten::silu": "other",
}


@pytest.mark.parametrize("name, expected", sorted(KNOWN.items()))
def test_categories_of_known_kernels(name, expected):
    assert category(name) == expected


def test_region_profile_of_a_pipeline_call():
    """Labelled regions count what the pipeline really calls; the pipeline is left unpatched."""
    pipe = tiny_sd_pipeline()
    workload = Workload(pipe, Shape(64, 64, 1), steps=4, prompt="a cat", seed=0, guidance_scale=7.5)
    profile = profile_method(Eager(), workload, torch.device("cpu"), runs=1)
    regions = profile.call.regions
    assert regions["unet"]["count"] == 4 and regions["scheduler.step"]["count"] == 4
    assert regions["vae.decode"]["count"] == 1 and regions["text_encoder"]["count"] >= 1
    assert [step.kind for step in profile.steps] == ["full"]
    breakdown = profile.steps[0].breakdown
    assert set(breakdown.by_category) == {label for label, _ in CATEGORIES} | {"other"}
    assert sum(breakdown.by_category.values()) == pytest.approx(breakdown.busy_s)
    for owner in (pipe.unet, pipe.scheduler, pipe.vae, pipe.text_encoder):
        assert not {"forward", "step", "decode"} & set(vars(owner)), "labelled_regions left a wrapper behind"


def test_labelled_regions_keep_existing_instance_attributes():
    pipe = tiny_sd_pipeline()
    marker = pipe.unet.forward
    pipe.unet.forward = marker  # an instance attribute, as fastcache's handle installs
    with labelled_regions(pipe):
        assert pipe.unet.forward is not marker
    assert vars(pipe.unet)["forward"] is marker
