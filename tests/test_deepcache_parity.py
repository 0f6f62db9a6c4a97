"""fastcache (eager split) against the DeepCache 0.1.1 package on tiny SD and SDXL pipelines.

Tolerances: the eager split calls the same modules in the same order as diffusers, so results are
expected to be bit-identical; the stated bound is 1e-5 (max abs difference of final latents,
whose magnitude here is 10-40). Caching changes these random-weight pipelines' latents by 0.03-3,
far above that bound, so a wrong layer or a wrong step would fail.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import HeunDiscreteScheduler

import fastcache
from fastcache.unet_split import unet_layout

from .helpers import (
    accelerated,
    deepcache_helper_with_schedule,
    deepcache_latents,
    latents,
    max_diff,
)

EAGER_TOLERANCE = 1e-5


@pytest.mark.covers(check="= DeepCache")
@pytest.mark.parametrize("interval", [2, 3, 5])
def test_every_branch_matches_deepcache(any_pipe, interval):
    for branch in range(unet_layout(any_pipe.unet).num_branches):
        expected = deepcache_latents(any_pipe, interval, branch)
        with accelerated(any_pipe, cache_interval=interval, cache_branch_id=branch, compile=False) as handle:
            actual = latents(any_pipe)
        assert max_diff(actual, expected) <= EAGER_TOLERANCE, f"branch {branch}, interval {interval}"
        assert handle.stats.last_call == [step % interval == 0 for step in range(10)]


@pytest.mark.covers(check="caching off = plain")
def test_caching_off_equals_the_plain_pipeline(any_pipe):
    expected = latents(any_pipe)
    with accelerated(any_pipe, cache_interval=1, compile=False) as handle:
        actual = latents(any_pipe)
    assert max_diff(actual, expected) <= 1e-6
    assert handle.stats.last_call == [True] * 10


def test_caching_changes_the_result(any_pipe):
    """Guards the parity tests: a cached run must differ from the uncached one by far more than 1e-5."""
    with accelerated(any_pipe, cache_interval=3, compile=False):
        cached = latents(any_pipe)
    assert max_diff(cached, latents(any_pipe)) > 100 * EAGER_TOLERANCE


def test_disable_restores_bit_identical_output(any_pipe):
    before = latents(any_pipe, seed=3)
    instance_forward = vars(any_pipe.unet).get("forward")  # DeepCache's disable leaves one behind
    pipe_class = type(any_pipe)
    handle = fastcache.accelerate(any_pipe, cache_interval=3, compile=False)
    assert type(any_pipe).__name__ == type(any_pipe).__mro__[1].__name__  # same-named subclass
    latents(any_pipe, seed=3)
    handle.disable()
    handle.disable()  # idempotent
    assert vars(any_pipe.unet).get("forward") is instance_forward and type(any_pipe) is pipe_class
    assert torch.equal(latents(any_pipe, seed=3), before)


@pytest.mark.covers('schedule="quadratic" (DeepCache\'s step list)', "= DeepCache")
def test_quadratic_schedule_matches_deepcache_mechanism(sd_pipe):
    """Non-uniform: DeepCache's helper only does uniform, so its wrapping runs with the quadratic steps."""
    steps = 20
    refresh_steps = {0, 7, 12, 16}  # DeepCache's sample_from_quad_center(20, 4, center=15, pow=1.4)
    helper = deepcache_helper_with_schedule(lambda step: step in refresh_steps)
    expected = deepcache_latents(sd_pipe, 5, 0, helper_class=helper, steps=steps)
    with accelerated(sd_pipe, cache_interval=5, schedule="quadratic", compile=False) as handle:
        actual = latents(sd_pipe, steps=steps)
    assert [i for i, r in enumerate(handle.stats.last_call) if r] == sorted(refresh_steps)
    assert max_diff(actual, expected) <= EAGER_TOLERANCE


@pytest.mark.covers("schedule=[refresh steps]", "= DeepCache")
def test_explicit_schedule_matches_deepcache_mechanism(sdxl_pipe):
    refresh_steps = {0, 1, 5, 6}
    helper = deepcache_helper_with_schedule(lambda step: step in refresh_steps)
    expected = deepcache_latents(sdxl_pipe, 99, 4, helper_class=helper)
    with accelerated(sdxl_pipe, cache_branch_id=4, schedule=[1, 5, 6], compile=False):
        actual = latents(sdxl_pipe)
    assert max_diff(actual, expected) <= EAGER_TOLERANCE


@pytest.mark.covers("HeunDiscreteScheduler", "= DeepCache")
def test_heun_counts_steps_not_unet_calls(sd_pipe):
    """Heun calls the U-Net twice per step; both evaluations of a refresh step run the full U-Net.

    DeepCache's ``timesteps.index(t)`` maps Heun's 7 calls for 4 steps to steps 0,1,1,3,3,5,5. The
    reference here is DeepCache's module wrapping driven by the true step of each call (0,0,1,1,2,2,3).
    """
    original = sd_pipe.scheduler
    sd_pipe.scheduler = HeunDiscreteScheduler.from_config(original.config)
    try:
        true_steps = iter([0, 0, 1, 1, 2, 2, 3])
        calls = []

        def refresh_on_even_step(_: int) -> bool:
            return calls[-1] % 2 == 0

        helper = deepcache_helper_with_schedule(refresh_on_even_step)
        hook = sd_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(next(true_steps)))
        try:
            expected = deepcache_latents(sd_pipe, 2, 0, helper_class=helper, steps=4)
        finally:
            hook.remove()
        assert calls == [0, 0, 1, 1, 2, 2, 3]
        with accelerated(sd_pipe, cache_interval=2, compile=False) as handle:
            actual = latents(sd_pipe, steps=4)
        assert handle.stats.last_call == [True, True, False, False, True, True, False]
        assert max_diff(actual, expected) <= EAGER_TOLERANCE
    finally:
        sd_pipe.scheduler = original


@pytest.mark.covers("height/width whose latents the U-Net's down-sampling does not divide", "= DeepCache")
@pytest.mark.covers("height/width whose latents the U-Net's down-sampling does not divide", "compiled (dynamo, no graph breaks)")
@pytest.mark.covers("height/width whose latents the U-Net's down-sampling does not divide", "emulated CUDA Graphs")
def test_sizes_the_down_sampling_does_not_divide_match_deepcache(any_pipe):
    """72x136 px: latents 9x17, which no down-sampling level divides evenly. The U-Net then passes
    each skip's size to its up-sampler (diffusers' forward_upsample_size), and so must the split."""
    size = dict(height=72, width=136)
    expected = {branch: deepcache_latents(any_pipe, 3, branch, **size)
                for branch in (0, unet_layout(any_pipe.unet).num_branches - 1)}
    for branch, reference in expected.items():
        with accelerated(any_pipe, cache_interval=3, cache_branch_id=branch, compile=False):
            assert max_diff(latents(any_pipe, **size), reference) <= EAGER_TOLERANCE, f"branch {branch}"
    with accelerated(any_pipe, cache_interval=3, compile_backend="eager", emulate_graphs=True) as handle:
        assert max_diff(latents(any_pipe, **size), expected[0]) <= EAGER_TOLERANCE, "dynamo + emulated graphs"
        assert handle.stats.cached_steps > 0
