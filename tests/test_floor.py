"""bench/floor.py: MACs counted from the real configs, against published and hand-derived figures."""

from __future__ import annotations

import pytest
import torch

from bench import configs
from bench.floor import dense_matmul_rate, floor_seconds, unet_work


@pytest.fixture(scope="module")
def sd15_512():
    return unet_work(configs._UNETS["sd15"], 512, 512, batch=1)


def test_sd15_full_unet_matches_the_published_figure(sd15_512):
    """SD 1.5 at 512x512: ~339 GMACs per image in convolutions and linear layers (the issue's figure)."""
    assert sd15_512.full_conv_linear_macs == pytest.approx(339e9, rel=0.01)


def test_sd15_attention_matmuls_by_hand(sd15_512):
    """Q@K^T and A@V per attention layer: 2 * tokens_q * tokens_kv * channels MACs.

    SD 1.5 has 16 transformer blocks (self + cross attention each): at 64x64 latents, levels with
    4096/1024/256 tokens and 320/640/1280 channels hold 5 blocks each (2 down + 3 up), the mid
    block one at 64 tokens (1280 channels); cross attention reads 77 text tokens.
    """
    expected = 0
    for tokens, channels, blocks in ((4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1)):
        expected += blocks * 2 * (tokens * tokens + tokens * 77) * channels
    assert sd15_512.full_attention_macs == pytest.approx(expected, rel=1e-9)


def test_shallow_branch_is_a_small_part_and_batch_scales_linearly(sd15_512):
    assert 0 < sd15_512.shallow_macs < 0.1 * sd15_512.full_macs
    doubled = unet_work(configs._UNETS["sd15"], 512, 512, batch=2)
    assert doubled.full_macs == pytest.approx(2 * sd15_512.full_macs, rel=1e-12)
    assert doubled.shallow_macs == pytest.approx(2 * sd15_512.shallow_macs, rel=1e-12)


def test_floor_seconds_from_a_measured_rate():
    rate = dense_matmul_rate(torch.device("cpu"), torch.float32, size=256, runs=3, per_run=2)
    assert rate.flops_per_s == pytest.approx(2 * 256**3 / rate.seconds.median)
    assert floor_seconds(1e9, rate) == pytest.approx(2e9 / rate.flops_per_s)
