"""Every scheduler the issue lists: caching off equals plain; caching on equals DeepCache's mechanism.

The reference is DeepCache's helper (its module wrapping, unchanged) told the step of each U-Net
call as the user counts steps: one per call for first-order schedulers; for Heun, DPM2 and DPM++
SDE the scheduler's ``state_in_first_order`` says a call is a step's correction. Where DeepCache's
own ``timesteps.index(t)`` gives those same steps (first-order schedulers without repeated
timesteps), the unmodified DeepCache package is checked too.
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


@pytest.fixture(params=sorted(SCHEDULERS))
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


def test_caching_off_equals_plain(scheduled_pipe):
    expected = latents(scheduled_pipe, steps=STEPS)
    with accelerated(scheduled_pipe, cache_interval=1, compile=False):
        assert max_diff(latents(scheduled_pipe, steps=STEPS), expected) <= 1e-6


@pytest.mark.parametrize("branch", [0, 5])
def test_cached_run_equals_deepcache(scheduled_pipe, branch):
    expected, steps = _reference(scheduled_pipe, branch)
    with accelerated(scheduled_pipe, cache_interval=INTERVAL, cache_branch_id=branch, compile=False) as handle:
        actual = latents(scheduled_pipe, steps=STEPS)
    assert handle.stats.last_call == [step % INTERVAL == 0 for step in steps]
    assert max_diff(actual, expected) <= 1e-5
    timesteps = [float(t) for t in scheduled_pipe.scheduler.timesteps]
    if steps == list(range(len(steps))) and len(set(timesteps)) == len(timesteps):
        assert max_diff(actual, deepcache_latents(scheduled_pipe, INTERVAL, branch, steps=STEPS)) <= 1e-5
