"""Every scheduler the issue lists: caching off equals plain; caching on equals DeepCache.

First-order schedulers: the unmodified DeepCache 0.1.1 helper is the reference. Second-order ones
(Heun, DPM2, DPM++ SDE) are where DeepCache's ``timesteps.index(t)`` step lookup is wrong; there the
reference is DeepCache's helper (its module wrapping, unchanged) told the step of each U-Net call
as the user counts steps: the scheduler's ``state_in_first_order`` marks a step's correction.
"""

from __future__ import annotations

import diffusers
import pytest

from .helpers import accelerated, deepcache_helper_with_schedule, deepcache_latents, latents, max_diff

STEPS = 6
INTERVAL = 3
SCHEDULERS = {
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD 1.5 ships it
    "LMS": ("LMSDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "EulerAncestral": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++2M-Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++SDE": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}),  # else seeded from the global RNG
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2Ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "TCD": ("TCDScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}


def _row(name: str) -> str:
    """The support-table row of a SCHEDULERS entry: its class, and Karras sigmas where used."""
    cls, options = SCHEDULERS[name]
    return cls + (" (Karras sigmas)" if options.get("use_karras_sigmas") else "")


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.covers(_row(name))) for name in sorted(SCHEDULERS)])
def scheduled_pipe(request, sd_pipe):
    name, options = SCHEDULERS[request.param]
    original = sd_pipe.scheduler
    sd_pipe.scheduler = getattr(diffusers, name).from_config(original.config, **options)
    yield sd_pipe
    sd_pipe.scheduler = original


def _reference(pipe, branch):
    """DeepCache's helper, refreshing on user-visible steps 0, 3, ... (counted by a pre-hook)."""
    steps = []

    def count(module, args):
        second = getattr(pipe.scheduler, "state_in_first_order", True) is False
        steps.append(steps[-1] if (steps and second) else (steps[-1] + 1 if steps else 0))

    helper = deepcache_helper_with_schedule(lambda _: steps[-1] % INTERVAL == 0)
    hook = pipe.unet.register_forward_pre_hook(count)
    try:
        return deepcache_latents(pipe, INTERVAL, branch, helper_class=helper, steps=STEPS), steps
    finally:
        hook.remove()


@pytest.mark.covers(check="caching off = plain")
def test_caching_off_equals_plain(scheduled_pipe):
    expected = latents(scheduled_pipe, steps=STEPS)
    with accelerated(scheduled_pipe, cache_interval=1, compile=False):
        assert max_diff(latents(scheduled_pipe, steps=STEPS), expected) <= 1e-6


@pytest.mark.covers(check="= DeepCache")
@pytest.mark.parametrize("branch", [0, 5])
def test_cached_run_equals_deepcache(scheduled_pipe, branch):
    second_order = hasattr(scheduled_pipe.scheduler, "state_in_first_order")
    if second_order:
        expected, steps = _reference(scheduled_pipe, branch)
    else:  # DeepCache's own timesteps.index(t) numbering is the reference (PNDM repeats one)
        expected = deepcache_latents(scheduled_pipe, INTERVAL, branch, steps=STEPS)
    with accelerated(scheduled_pipe, cache_interval=INTERVAL, cache_branch_id=branch, compile=False) as handle:
        actual = latents(scheduled_pipe, steps=STEPS)
    if second_order:
        assert handle.stats.last_call == [step % INTERVAL == 0 for step in steps]
    assert max_diff(actual, expected) <= 1e-5


@pytest.mark.covers("PNDMScheduler", "= DeepCache")
@pytest.mark.parametrize("interval", [2, 3, 4, 5])
def test_pndm_as_sd15_ships_it_equals_deepcache_at_every_interval(sd_pipe, interval):
    """PNDM/PLMS calls the U-Net 21 times for 20 steps; DeepCache numbers them 0,1,1,3,4,..."""
    original = sd_pipe.scheduler
    sd_pipe.scheduler = diffusers.PNDMScheduler.from_config(original.config, skip_prk_steps=True)
    try:
        expected = deepcache_latents(sd_pipe, interval, 0, steps=20)
        with accelerated(sd_pipe, cache_interval=interval, compile=False) as handle:
            actual = latents(sd_pipe, steps=20)
        deepcache_steps = [0, 1, 1] + list(range(3, 21))
        assert handle.stats.last_call == [step % interval == 0 for step in deepcache_steps]
        assert max_diff(actual, expected) <= 1e-5
    finally:
        sd_pipe.scheduler = original
