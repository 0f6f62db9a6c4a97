"""`python -m fastcache serve` flags: values out of range are refused before anything loads, each
with a message naming the flag and what it allows."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("fastapi")

from fastcache.serve.config import ServeConfig, add_arguments, from_args  # noqa: E402


def _config(*flags: str) -> ServeConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(list(flags)))


def test_the_connection_limit_defaults_to_512_or_what_the_queue_needs():
    assert _config().connection_limit == 512
    assert _config("--max-queue", "1000").connection_limit == 1006  # 1000 queued + 4 running + 2 probes
    assert _config("--max-connections", "80").connection_limit == 80


@pytest.mark.parametrize("flags, message", [
    # 8 queued + 4 images in the running call + /health + /metrics
    (["--max-queue", "8", "--max-connections", "13"], r"--max-connections must be at least .*\(14\)"),
    (["--max-queue", "1000", "--max-connections", "1000"], r"--max-connections must be at least .*\(1006\)"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--body-timeout", "0"], "--body-timeout must be positive"),
    (["--max-body-bytes", "512"], "--max-body-bytes must be at least 1024"),
    (["--sizes", "100x128"], "positive multiples of 8"),
    (["--batch-sizes", "1,4", "--max-batch-size", "5"], r"--max-batch-size must be in 1\.\.4"),
    (["--default-steps", "200"], r"--default-steps must be in 1\.\.--max-steps"),
    (["--gate-step", "0"], "--gate-step must be at least 1"),
    (["--gate-step", "10", "--accelerator", "deepcache"], r"--gate-step needs --accelerator fastcache \(got deepcache\)"),
    (["--gate-step", "10", "--accelerator", "none"], r"--gate-step needs --accelerator fastcache \(got none\)"),
])
def test_values_out_of_range_are_refused_with_the_flag_and_its_range(flags, message):
    with pytest.raises(ValueError, match=message):
        _config(*flags)


def test_the_smallest_allowed_connection_limit_is_accepted():
    assert _config("--max-queue", "8", "--max-connections", "14").connection_limit == 14


def test_gate_step_parses_and_defaults_to_off():
    assert _config().gate_step is None
    assert _config("--gate-step", "10").gate_step == 10


def test_gate_step_on_a_unet_that_embeds_guidance_is_refused_and_the_pipeline_left_as_it_was():
    """An LCM-style U-Net (time_cond_proj_dim) runs without classifier-free guidance, which TGATE
    needs: the server refuses at start, before accelerating anything."""
    import fastcache
    from fastcache.serve.accelerators import FastCacheAccelerator
    from fastcache.tiny import two_level_sd_pipeline

    pipe = two_level_sd_pipeline()
    pipe.unet.register_to_config(time_cond_proj_dim=6)
    with pytest.raises(ValueError, match=r"--gate-step \(TGATE\) needs classifier-free guidance.*embeds guidance"):
        FastCacheAccelerator(pipe, _config("--gate-step", "3"))
    fastcache.accelerate(pipe, compile=False).disable()  # raises if the pipeline were accelerated
