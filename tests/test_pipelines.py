"""Pipeline families and call options against DeepCache 0.1.1 and the plain pipeline (eager split).

For each case: caching off equals the plain pipeline (<= 1e-6), and caching on (interval 3, a
shallow and a deeper branch) equals DeepCache's helper (<= 1e-5; both are exact in practice).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)

from fastcache.tiny import tiny_sd2_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_sdxl_refiner

from .helpers import accelerated, deepcache_latents, latents, max_diff

IMAGE = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
MASK = torch.zeros(1, 1, 128, 128)
MASK[..., 32:96, 40:100] = 1.0


# The runtimes a pipeline family is also checked through at branch 0 (the production default),
# against the same DeepCache latents: graph replay semantics on the eager split (a recording
# replayed, Python values baked in), and dynamo's trace with fullgraph=True (backend "eager": no
# inductor codegen, so seconds, not minutes) replayed through static buffers.
RUNTIMES = {
    "emulated graphs": dict(compile=False, emulate_graphs=True),
    "dynamo + emulated graphs": dict(compile_backend="eager", emulate_graphs=True),
}


def _check(pipe, branches=(0, 5), runtimes=False, **call):
    expected_plain = latents(pipe, **call)
    with accelerated(pipe, cache_interval=1, compile=False):
        assert max_diff(latents(pipe, **call), expected_plain) <= 1e-6, "caching off"
    for branch in branches:
        expected = deepcache_latents(pipe, 3, branch, **call)
        with accelerated(pipe, cache_interval=3, cache_branch_id=branch, compile=False) as handle:
            actual = latents(pipe, **call)
        assert handle.stats.cached_steps > 0
        assert max_diff(actual, expected) <= 1e-5, f"branch {branch}"
        assert max_diff(actual, expected_plain) > 1e-3, "caching must change this pipeline's output"
        if runtimes and branch == 0:
            for runtime, options in RUNTIMES.items():
                with accelerated(pipe, cache_interval=3, cache_branch_id=0, **options) as handle:
                    assert max_diff(latents(pipe, **call), expected) <= 1e-5, runtime
                assert handle.stats.cached_steps > 0, runtime


PIPELINES = {
    "sd-img2img": lambda: (tiny_sd_pipeline(pipeline_class=StableDiffusionImg2ImgPipeline), dict(image=IMAGE, strength=0.7)),
    "sd-inpaint-9ch": lambda: (tiny_sd_pipeline(pipeline_class=StableDiffusionInpaintPipeline, in_channels=9),
                               dict(image=IMAGE, mask_image=MASK, strength=1.0)),
    "sd-inpaint-4ch": lambda: (tiny_sd_pipeline(pipeline_class=StableDiffusionInpaintPipeline),
                               dict(image=IMAGE, mask_image=MASK, strength=0.8)),
    "sd2": lambda: (tiny_sd2_pipeline(), dict(guidance_rescale=0.7)),  # 2.1 768-v: v-prediction, rescaled CFG
    "sdxl-img2img": lambda: (tiny_sdxl_pipeline(pipeline_class=StableDiffusionXLImg2ImgPipeline), dict(image=IMAGE, strength=0.7)),
    "sdxl-inpaint": lambda: (tiny_sdxl_pipeline(pipeline_class=StableDiffusionXLInpaintPipeline),
                             dict(image=IMAGE, mask_image=MASK, strength=0.9)),
    "sdxl-refiner": lambda: (tiny_sdxl_refiner(), dict(image=IMAGE, strength=0.6, aesthetic_score=7.0)),
    "sdxl-refiner-denoising-start": lambda: (tiny_sdxl_refiner(), dict(image=torch.randn(1, 4, 16, 16), denoising_start=0.4)),
}


# The support-table row of each PIPELINES entry.
PIPELINE_ROWS = {
    "sd-img2img": "StableDiffusionImg2ImgPipeline",
    "sd-inpaint-9ch": "StableDiffusionInpaintPipeline (9-channel U-Net)",
    "sd-inpaint-4ch": "StableDiffusionInpaintPipeline (4-channel U-Net, mask blend)",
    "sd2": "StableDiffusionPipeline, SD 2.x (linear projections, head size per level, upcast attention, v-prediction)",
    "sdxl-img2img": "StableDiffusionXLImg2ImgPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
    "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline (refiner, aesthetic score)",
    "sdxl-refiner-denoising-start": "StableDiffusionXLImg2ImgPipeline (refiner, denoising_start)",
}


@pytest.mark.covers(check="caching off = plain")
@pytest.mark.covers(check="= DeepCache")
@pytest.mark.covers(check="compiled (dynamo, no graph breaks)")
@pytest.mark.covers(check="emulated CUDA Graphs")
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.covers(PIPELINE_ROWS[name])) for name in sorted(PIPELINES)])
def test_pipeline_family(name):
    pipe, call = PIPELINES[name]()
    _check(pipe, steps=12, runtimes=True, **call)


@pytest.mark.covers("StableDiffusionXLPipeline (denoising_end)", "caching off = plain")
@pytest.mark.covers("StableDiffusionXLPipeline (denoising_end)", "= DeepCache")
@pytest.mark.covers("StableDiffusionXLPipeline (denoising_end)", "compiled (dynamo, no graph breaks)")
@pytest.mark.covers("StableDiffusionXLPipeline (denoising_end)", "emulated CUDA Graphs")
def test_sdxl_base_with_denoising_end(sdxl_pipe):
    _check(sdxl_pipe, steps=12, runtimes=True, denoising_end=0.6)


CALL_OPTIONS = {
    "num_images_per_prompt": dict(num_images_per_prompt=2),
    "guidance-off": dict(guidance_scale=1.0),
    "guidance_rescale": dict(guidance_rescale=0.7),
    "negative_prompt": dict(negative_prompt="blurry, low quality"),
    "generator-per-image": dict(num_images_per_prompt=2, generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]),
}


BOTH = ("caching off = plain", "= DeepCache")
# The support-table row of each CALL_OPTIONS case and the checks its test makes (a generator list
# has no caching-off run).
CALL_OPTION_ROWS = {
    "num_images_per_prompt": ("num_images_per_prompt=2", BOTH),
    "guidance-off": ("guidance_scale=1 (no classifier-free guidance)", BOTH),
    "guidance_rescale": ("guidance_rescale", BOTH),
    "negative_prompt": ("negative_prompt", BOTH),
    "generator-per-image": ("generator list, one per image", ("= DeepCache",)),
}
CLIP_SKIP_FAILS = "plain diffusers 0.42.1 with transformers 5 fails with clip_skip on CLIPTextModel"


def _call_option(name: str):
    row, checks = CALL_OPTION_ROWS[name]
    return pytest.param(name, marks=[pytest.mark.covers(row, check) for check in checks])


@pytest.mark.parametrize("name", [_call_option(name) for name in sorted(CALL_OPTIONS)])
def test_call_options(any_pipe, name):
    call = dict(CALL_OPTIONS[name])
    if "generator" in call:  # latents() supplies one generator; a list replaces it, fresh each run
        seeds = [g.initial_seed() for g in call.pop("generator")]
        _check_with_generators(any_pipe, seeds, **call)
        return
    _check(any_pipe, **call)


@pytest.mark.parametrize("kind", [
    # SD 1.x's pipeline reads `text_encoder.text_model`, which transformers 5's CLIPTextModel lacks:
    # the plain pipeline fails before fastcache runs (strict: an XPASS fails, so the table cannot
    # claim a failure that is gone).
    pytest.param("sd", marks=[*(pytest.mark.covers("clip_skip (SD 1.x pipelines)", check, xfail=CLIP_SKIP_FAILS)
                                for check in BOTH),
                              pytest.mark.xfail(raises=AttributeError, strict=True, reason=CLIP_SKIP_FAILS)]),
    pytest.param("sdxl", marks=[pytest.mark.covers("clip_skip (SDXL pipelines)", check) for check in BOTH]),
])
def test_clip_skip(kind, sd_pipe, sdxl_pipe):
    _check(sd_pipe if kind == "sd" else sdxl_pipe, clip_skip=1)


def _check_with_generators(pipe, seeds, **call):
    def run(**kwargs):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe("a cat", num_inference_steps=10, generator=generators, output_type="latent", **call, **kwargs).images

    plain = run()
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        expected = run()
    finally:
        helper.disable()
    with accelerated(pipe, cache_interval=3, compile=False):
        actual = run()
    assert max_diff(actual, expected) <= 1e-5 and max_diff(actual, plain) > 1e-3


@pytest.mark.covers("prompt_embeds, negative_prompt_embeds", "caching off = plain")
@pytest.mark.covers("prompt_embeds, negative_prompt_embeds", "= DeepCache")
def test_prompt_embeddings_passed_in(sd_pipe):
    positive, negative = sd_pipe.encode_prompt("a cat", "cpu", 1, True, negative_prompt="a dog")
    _check(sd_pipe, prompt=None, prompt_embeds=positive, negative_prompt_embeds=negative)


@pytest.mark.covers("callback_on_step_end edits latents", "caching off = plain")
@pytest.mark.covers("callback_on_step_end edits latents", "= DeepCache")
def test_callback_that_edits_latents(any_pipe):
    def damp(pipe, step, timestep, tensors):
        return {"latents": tensors["latents"] * 0.98}

    _check(any_pipe, callback_on_step_end=damp, callback_on_step_end_tensor_inputs=["latents"])


# -- PNDM (SD 1.x's default scheduler) in img2img and inpaint pipelines ------------------------------
# PNDM in PLMS mode has the timesteps [t0, t1, t1, t2, ...]; an img2img call with strength < 1 runs
# them from position t_start on, and DeepCache numbers each call ``timesteps.index(t)`` in that full
# list, counted from the first call's number. So the repeat takes the step number of the call
# before it only when it is in the slice: t_start 0 numbers the calls 0,1,1,3,4,..., t_start 1
# 0,0,2,3,..., t_start 2 0,2,3,4,... and t_start >= 3 0,1,2,3,...
PNDM_PIPELINES = {
    "sd-img2img": lambda: (tiny_sd_pipeline(pipeline_class=StableDiffusionImg2ImgPipeline), dict(image=IMAGE)),
    "sd-inpaint-9ch": lambda: (tiny_sd_pipeline(pipeline_class=StableDiffusionInpaintPipeline, in_channels=9),
                               dict(image=IMAGE, mask_image=MASK)),
    "sd-inpaint-4ch": lambda: (tiny_sd_pipeline(pipeline_class=StableDiffusionInpaintPipeline),
                               dict(image=IMAGE, mask_image=MASK)),
    "sdxl-img2img": lambda: (tiny_sdxl_pipeline(pipeline_class=StableDiffusionXLImg2ImgPipeline), dict(image=IMAGE)),
}
# (steps, strength, interval): t_start 7, 5, 2, 1, 0 at 10 steps and 3 at 5, at intervals that tell
# every numbering above apart (2: is call 2 a refresh; 3: is call 2 or 3 one). 10 steps, 0.8,
# interval 3 is the issue's case (test below). The other pipelines share get_timesteps: a subset.
PNDM_CASES = [(10, 0.3, 2), (10, 0.5, 3), (10, 0.8, 2), (10, 0.9, 2), (10, 0.9, 3), (10, 1.0, 2), (5, 0.5, 2)]
PNDM_SUBSET = [(10, 0.5, 2), (10, 0.8, 3), (10, 0.9, 2)]


def _with_pndm(pipe):
    from diffusers import PNDMScheduler

    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)  # as SD 1.5 ships it
    return pipe


def deepcache_steps_and_latents(pipe, interval, **call):
    """DeepCache's latents and its step number for each U-Net call (its ``cur_timestep``, read
    after the call, counted from the first call's), from the unmodified 0.1.1 helper."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    numbers = []
    helper_forward = pipe.unet.forward

    def recording_forward(*args, **kwargs):
        result = helper_forward(*args, **kwargs)
        numbers.append(helper.cur_timestep)
        return result

    pipe.unet.forward = recording_forward
    try:
        result = latents(pipe, **call)
    finally:
        pipe.unet.forward = helper_forward
        helper.disable()
    return result, [number - numbers[0] for number in numbers]


@pytest.mark.covers("PNDMScheduler", "= DeepCache")
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.covers(PIPELINE_ROWS[name], "= DeepCache")) for name in sorted(PNDM_PIPELINES)
])
def test_pndm_img2img_refreshes_at_deepcache_steps(name):
    """At every strength (t_start 0, 1, 2 and beyond), fastcache refreshes at DeepCache's steps
    and gives its latents (eager split, <= 1e-5; both exact in practice)."""
    pipe, call = PNDM_PIPELINES[name]()
    _with_pndm(pipe)
    for steps, strength, interval in PNDM_CASES if name == "sd-img2img" else PNDM_SUBSET:
        where = f"{steps} steps, strength {strength}, interval {interval}"
        expected, numbers = deepcache_steps_and_latents(pipe, interval, steps=steps, strength=strength, **call)
        with accelerated(pipe, cache_interval=interval, compile=False) as handle:
            actual = latents(pipe, steps=steps, strength=strength, **call)
        assert handle.stats.last_call == [number % interval == 0 for number in numbers], where
        assert max_diff(actual, expected) <= 1e-5, where


def test_pndm_img2img_at_strength_0_8_refreshes_as_the_issue_measured():
    """The issue's case: 10 steps, strength 0.8 (t_start 2), interval 3: DeepCache refreshes at
    calls 0, 2, 5, 8 (numbers 0,2,3,...,9), not 0, 3, 6 as counting calls gives."""
    pipe, call = PNDM_PIPELINES["sd-img2img"]()
    _with_pndm(pipe)
    expected, numbers = deepcache_steps_and_latents(pipe, 3, steps=10, strength=0.8, **call)
    assert numbers == [0, 2, 3, 4, 5, 6, 7, 8, 9]
    with accelerated(pipe, cache_interval=3, compile=False) as handle:
        actual = latents(pipe, steps=10, strength=0.8, **call)
    assert "".join("R" if refresh else "c" for refresh in handle.stats.last_call) == "RcRccRccR"
    assert max_diff(actual, expected) <= 1e-5
    assert max_diff(actual, latents(pipe, steps=10, strength=0.8, **call)) > 1e-3, "caching must change the output"


@pytest.mark.covers("StableDiffusionImg2ImgPipeline", "= DeepCache")
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_first_order_img2img_numbers_steps_by_call_as_deepcache(scheduler):
    """Schedulers without a repeated timestep: DeepCache's numbers are the call indices at every
    t_start (here 1 and 2, where PNDM differs), and fastcache matches them."""
    import diffusers

    pipe, call = PNDM_PIPELINES["sd-img2img"]()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    for strength, interval in ((0.9, 2), (0.8, 3)):  # t_start 1 and 2 at 6 steps
        expected, numbers = deepcache_steps_and_latents(pipe, interval, steps=6, strength=strength, **call)
        assert numbers == list(range(len(numbers)))
        with accelerated(pipe, cache_interval=interval, compile=False) as handle:
            actual = latents(pipe, steps=6, strength=strength, **call)
        assert handle.stats.last_call == [number % interval == 0 for number in numbers], strength
        assert max_diff(actual, expected) <= 1e-5, strength
