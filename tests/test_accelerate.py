"""accelerate()'s contract: errors leave the pipeline untouched, state never goes stale."""

from __future__ import annotations

import copy
import importlib
import logging
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

import fastcache
from fastcache.errors import (
    AlreadyAcceleratedError,
    CompileError,
    InvalidConfigError,
    UnsupportedInputError,
    UnsupportedPipelineError,
)

from .helpers import accelerated, assert_untouched, deepcache_latents, latents, max_diff


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(cache_branch_id=12), InvalidConfigError, r"valid ids are 0\.\.11"),
        (dict(cache_branch_id=-1), InvalidConfigError, r"valid ids are 0\.\.11"),
        (dict(cache_interval=0), InvalidConfigError, r"cache_interval must be an int >= 1"),
        (dict(schedule="linear"), InvalidConfigError, r"unknown schedule 'linear'"),
        (dict(compile="yes"), InvalidConfigError, r"compile must be True or False"),
        (dict(cuda_graphs=True), InvalidConfigError, r"cuda_graphs=True needs the U-Net on a CUDA device"),
    ],
)
def test_bad_arguments_raise_and_leave_the_pipeline_untouched(sd_pipe, options, error, message):
    before = latents(sd_pipe, steps=3)
    with pytest.raises(error, match=message):
        fastcache.accelerate(sd_pipe, **options)
    assert_untouched(sd_pipe)
    assert torch.equal(latents(sd_pipe, steps=3), before)


def test_sdxl_branch_range_is_its_own(sdxl_pipe):
    with pytest.raises(InvalidConfigError, match=r"valid ids are 0\.\.8 \(3 levels x 3 layers"):
        fastcache.accelerate(sdxl_pipe, cache_branch_id=9)
    assert_untouched(sdxl_pipe)


class _FakePipeline:
    """Callable, with a scheduler and whatever components a test gives it."""

    def __init__(self, **components):
        self.scheduler = None
        self.__dict__.update(components)

    def __call__(self):
        return None


def test_unknown_pipelines_are_refused(sd_pipe):
    with pytest.raises(UnsupportedPipelineError, match="needs a `unet`"):
        fastcache.accelerate(SimpleNamespace(scheduler=None))
    with pytest.raises(UnsupportedPipelineError, match="unet is Linear"):
        fastcache.accelerate(_FakePipeline(unet=torch.nn.Linear(2, 2)))
    with pytest.raises(UnsupportedPipelineError, match=r"already wrapped by torch.compile.*_orig_mod"):
        fastcache.accelerate(_FakePipeline(unet=torch.compile(sd_pipe.unet)))
    assert_untouched(sd_pipe)


def test_enabling_twice_is_refused(sd_pipe):
    with accelerated(sd_pipe, compile=False):
        with pytest.raises(AlreadyAcceleratedError, match="already accelerated"):
            fastcache.accelerate(sd_pipe, compile=False)
        assert type(sd_pipe)._fastcache_handle is not None


def test_deepcache_helper_enabled_is_detected(sd_pipe):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=sd_pipe)
    helper.set_params(cache_interval=3)
    helper.enable()
    try:
        with pytest.raises(AlreadyAcceleratedError, match="DeepCache"):
            fastcache.accelerate(sd_pipe, compile=False)
    finally:
        helper.disable()


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(cross_attention_kwargs={"scale": 0.5, "gligen": None}), "cross_attention_kwargs"),
        (dict(added_cond_kwargs={"hint": torch.zeros(1)}), "hint"),
        (dict(down_block_additional_residuals=(torch.zeros(1),)), "T2I-Adapter path"),
        (dict(down_intrablock_additional_residuals=(torch.zeros(1),)), "T2I-Adapter residuals"),
        (dict(class_labels=torch.zeros(1)), "class_labels"),
    ],
)
def test_unsupported_unet_inputs_raise_clearly(sd_pipe, call, message):
    with accelerated(sd_pipe, compile=False) as handle:
        sample = torch.zeros(2, 4, 16, 16)
        with pytest.raises(UnsupportedInputError, match=message):
            sd_pipe.unet(sample, 10, torch.zeros(2, 77, 32), **call)
        assert handle.enabled


def test_inputs_that_require_grad_raise_instead_of_losing_their_gradient(sd_pipe):
    """A loop differentiating through the U-Net (gradient guidance) would otherwise get an output
    with no autograd history, and a confusing error later."""
    with accelerated(sd_pipe, compile=False):
        sample = torch.zeros(2, 4, 16, 16, requires_grad=True)
        with pytest.raises(UnsupportedInputError, match="require grad"):
            sd_pipe.unet(sample, 10, torch.zeros(2, 77, 32))
        with torch.no_grad():  # no gradient asked for: runs
            assert sd_pipe.unet(sample, 10, torch.zeros(2, 77, 32)).sample.shape == sample.shape


def test_unsupported_input_through_the_pipeline(sd_pipe):
    with accelerated(sd_pipe, compile=False):
        with pytest.raises(UnsupportedInputError, match="cross_attention_kwargs"):
            latents(sd_pipe, steps=2, cross_attention_kwargs={"gligen": None})


def test_compile_failure_restores_the_pipeline(sd_pipe):
    from torch._dynamo import register_backend

    @register_backend(name="fastcache_test_failing_backend")
    def failing_backend(graph, example_inputs):
        raise RuntimeError("simulated compiler crash")

    before = latents(sd_pipe, steps=3)
    handle = fastcache.accelerate(sd_pipe, compile_backend="fastcache_test_failing_backend")
    with pytest.raises(CompileError, match="simulated compiler crash(.|\n)*restored to its original state"):
        latents(sd_pipe, steps=3)
    assert not handle.enabled
    assert_untouched(sd_pipe)
    assert torch.equal(latents(sd_pipe, steps=3), before)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(compile_mode="reduce-overhead"), "inductor's own CUDA Graphs"),
        (dict(compile_mode="max-autotune"), "inductor's own CUDA Graphs"),
        (dict(compile_mode="fastest"), "compile_mode must be"),
        (dict(compile_mode="default", compile_options={"epilogue_fusion": False}), "not both"),
        (dict(compile_options={"not_an_inductor_option": 1}), "not_an_inductor_option"),
    ],
)
def test_bad_compile_settings_raise_before_touching_the_pipeline(sd_pipe, options, message):
    with pytest.raises(InvalidConfigError, match=message):
        fastcache.accelerate(sd_pipe, **options)
    assert_untouched(sd_pipe)


def test_compile_options_reach_the_backend(sd_pipe):
    """Inductor options are handed to torch.compile (a recording backend sees them) and the result
    still equals DeepCache."""
    from torch._dynamo import register_backend

    seen: list[dict] = []

    @register_backend(name="fastcache_test_recording_backend")
    def recording_backend(graph, example_inputs, **kwargs):
        seen.append(kwargs)
        return graph.forward

    expected = deepcache_latents(sd_pipe, 2, 0, steps=4)
    with accelerated(sd_pipe, cache_interval=2, compile_backend="fastcache_test_recording_backend",
                     compile_options={"conv_1x1_as_mm": True}):
        assert max_diff(latents(sd_pipe, steps=4), expected) <= 1e-5
    assert seen and all(kwargs.get("options") == {"conv_1x1_as_mm": True} for kwargs in seen)


def test_capture_failure_restores_the_pipeline(sd_pipe, monkeypatch):
    from fastcache import graphs

    def broken_capture(self, function, pool, emulate):
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(graphs.CapturedFunction, "__init__", broken_capture)
    handle = fastcache.accelerate(sd_pipe, compile=False, emulate_graphs=True)
    with pytest.raises(CompileError, match="simulated capture failure"):
        latents(sd_pipe, steps=3)
    assert not handle.enabled
    assert_untouched(sd_pipe)


def _back_to_back_calls():
    return [
        dict(),
        dict(height=64, width=96),
        dict(num_images_per_prompt=2),
        dict(guidance_scale=1.0),  # no classifier-free guidance: the U-Net batch halves
        dict(),
    ]


@pytest.mark.parametrize("options", [dict(compile=False), dict(compile=False, emulate_graphs=True)],
                         ids=["eager", "emulated-graphs"])
def test_back_to_back_calls_equal_fresh_accelerations(sd_pipe, options):
    fresh = []
    for call in _back_to_back_calls():
        with accelerated(sd_pipe, cache_interval=3, cache_branch_id=2, **options):
            fresh.append(latents(sd_pipe, seed=1, **call))
    with accelerated(sd_pipe, cache_interval=3, cache_branch_id=2, **options) as handle:
        for call, expected in zip(_back_to_back_calls(), fresh):
            actual = latents(sd_pipe, seed=1, **call)
            assert max_diff(actual, expected) <= 1e-6, call
            assert handle.stats.last_call[0] is True
    assert handle.stats.pipeline_calls == len(fresh)


def test_img2img_strength_changes_equal_fresh_accelerations(sd_pipe):
    img2img = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    strengths = [0.5, 0.8, 0.3, 0.8]
    fresh = []
    for strength in strengths:
        with accelerated(img2img, cache_interval=2, compile=False, emulate_graphs=True):
            fresh.append(latents(img2img, seed=2, image=image, strength=strength))
    with accelerated(img2img, cache_interval=2, compile=False, emulate_graphs=True) as handle:
        for strength, expected in zip(strengths, fresh):
            assert max_diff(latents(img2img, seed=2, image=image, strength=strength), expected) <= 1e-6
            assert handle.stats.last_call[0] is True
            assert len(handle.stats.last_call) == int(10 * strength)
    assert_untouched(img2img)


def test_calls_outside_the_pipeline_warn_once(sd_pipe, caplog):
    with accelerated(sd_pipe, compile=False) as handle:
        with caplog.at_level(logging.WARNING, logger="fastcache"):
            for _ in range(3):
                sd_pipe.unet(torch.zeros(2, 4, 16, 16), 10, torch.zeros(2, 77, 32))
        assert caplog.text.count("outside the accelerated pipeline") == 1
    caplog.clear()
    with accelerated(sd_pipe, cache_interval=2, compile=False) as handle:  # a custom loop that re-arms
        with caplog.at_level(logging.WARNING, logger="fastcache"):
            handle.reset()
            for _ in range(3):
                sd_pipe.unet(torch.zeros(2, 4, 16, 16), 10, torch.zeros(2, 77, 32))
        assert caplog.text == "" and handle.stats.last_call == [True, False, True]


def test_custom_loops_check_the_model_every_call_until_reset_then_at_reset(sd_pipe, monkeypatch):
    """A model change (here a weight given new storage) is noticed by the next direct U-Net call
    of a loop that never called reset(); once reset() is used, it is noticed there and the
    per-call fingerprint (0.65 ms for SD 1.5's U-Net) leaves the steps."""
    accelerate_module = importlib.import_module("fastcache.accelerate")  # the package re-exports the function
    checks: list[int] = []
    fingerprint = accelerate_module.model_fingerprint
    monkeypatch.setattr(accelerate_module, "model_fingerprint", lambda model: checks.append(1) or fingerprint(model))
    weight = sd_pipe.unet.conv_out.weight
    original = weight.data
    args = (torch.zeros(2, 4, 16, 16), 10, torch.zeros(2, 77, 32))
    try:
        with accelerated(sd_pipe, cache_interval=2, compile=False) as handle:
            runner = handle._runner
            weight.data = original.clone()
            sd_pipe.unet(*args)
            assert handle._runner is not runner, "an unmanaged loop must notice the new storage at once"
            handle.reset()
            checks.clear()
            for _ in range(3):
                sd_pipe.unet(*args)
            assert checks == [], "after reset(), direct calls must not fingerprint the model"
            runner = handle._runner
            weight.data = original.clone()
            handle.reset()
            assert handle._runner is not runner, "reset() must notice the new storage"
            refreshes = handle.stats.refresh_steps
            sd_pipe.unet(*args)
            assert handle.stats.refresh_steps == refreshes + 1, "the first call after reset() refreshes"
    finally:
        weight.data = original


def test_runtime_names_the_runner(sd_pipe):
    for options, name in ((dict(compile=False), "eager"), (dict(), "compiled"),
                          (dict(compile=False, emulate_graphs=True), "emulated-graphs")):
        with accelerated(sd_pipe, **options) as handle:
            assert handle.runtime == name


def test_warmup_follows_the_serving_call_arguments(sd_pipe):
    """Shapes come from the call: no CFG halves the U-Net batch; prompt embeddings replace the prompt."""
    embeddings, _ = sd_pipe.encode_prompt("a cat", "cpu", 1, False)
    with accelerated(sd_pipe, cache_interval=3, compile=False) as handle:
        report = handle.warmup(batch_size=2, guidance_scale=1.0, prompt_embeds=embeddings.repeat(1, 1, 1))
        assert report.new_shapes == ("batch 2, latents 4x16x16, float32 on cpu",)
        assert handle.stats.last_call == [True, False, False]
    with accelerated(sd_pipe, cache_interval=1, compile=False) as handle:
        handle.warmup(height=64, width=64)
        assert handle.stats.last_call == [True, True, True]


def test_changing_the_scheduler_between_calls_equals_fresh_accelerations(sd_pipe):
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    original = sd_pipe.scheduler
    schedulers = [original, EulerDiscreteScheduler.from_config(original.config),
                  HeunDiscreteScheduler.from_config(original.config), original]
    try:
        fresh = []
        for scheduler in schedulers:
            sd_pipe.scheduler = scheduler
            with accelerated(sd_pipe, cache_interval=3, compile=False):
                fresh.append(latents(sd_pipe, steps=6))
        with accelerated(sd_pipe, cache_interval=3, compile=False) as handle:
            for scheduler, expected in zip(schedulers, fresh):
                sd_pipe.scheduler = scheduler
                assert max_diff(latents(sd_pipe, steps=6), expected) <= 1e-6, type(scheduler).__name__
                assert handle.stats.last_call[0] is True
    finally:
        sd_pipe.scheduler = original


def test_pipe_to_another_dtype_after_accelerate(sd_pipe):
    """New dtype, new shape key: graphs are prepared again and results follow the moved pipeline."""
    try:
        with accelerated(sd_pipe, cache_interval=3, compile=False, emulate_graphs=True) as handle:
            latents(sd_pipe, steps=4)
            sd_pipe.to(torch.float64)
            actual = latents(sd_pipe, steps=4)
            # The weights' new storage is noticed: a new runner captured both graphs (the old freed).
            assert actual.dtype == torch.float64 and handle._runner.captures == 2
        expected = deepcache_latents(sd_pipe, 3, 0, steps=4)
        assert max_diff(actual, expected) <= 1e-12
    finally:
        sd_pipe.to(torch.float32)


def test_model_offload_is_refused_clearly(sd_pipe):
    """accelerate's offload hooks replace forward; fastcache refuses rather than risk wrong images."""
    sd_pipe.unet._hf_hook = object()
    try:
        with pytest.raises(UnsupportedPipelineError, match="offload"):
            fastcache.accelerate(sd_pipe, compile=False)
    finally:
        del sd_pipe.unet._hf_hook
    with accelerated(sd_pipe, compile=False):
        sd_pipe.unet._hf_hook = object()
        try:
            with pytest.raises(UnsupportedInputError, match="offload"):
                latents(sd_pipe, steps=2)
        finally:
            del sd_pipe.unet._hf_hook


class _Worker(threading.Thread):
    """Runs `target` on a thread of its own, keeping its result or exception for `outcome()`."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self._work, self._result, self._error = target, None, None
        self.start()

    def run(self):
        try:
            self._result = self._work()
        except BaseException as error:  # noqa: BLE001 (raised again by outcome())
            self._error = error

    def outcome(self, timeout=120):
        self.join(timeout)
        assert not self.is_alive(), "the thread is still running"
        if self._error is not None:
            raise self._error
        return self._result


def test_calls_from_two_threads_run_one_after_the_other(sd_pipe):
    """A second thread's call waits for the first: each gives its own sequential result.

    The first call stops in a step callback until the second thread is about to call the
    pipeline; unserialised, the second call would re-arm the dispatcher and overwrite the static
    buffers in the middle of the first, and both results would differ from the references.
    """
    with accelerated(sd_pipe, cache_interval=3, compile=False) as handle:
        expected = {seed: latents(sd_pipe, seed=seed) for seed in (1, 2)}
        first_inside, second_starting = threading.Event(), threading.Event()

        def hold_first_call(pipe, step, timestep, tensors):
            if step == 1:
                first_inside.set()
                second_starting.wait(timeout=30)
                time.sleep(0.2)  # the second call is now waiting, or would be running
            return {}

        def second():
            first_inside.wait(timeout=30)
            second_starting.set()
            return latents(sd_pipe, seed=2)

        first = _Worker(lambda: latents(sd_pipe, seed=1, callback_on_step_end=hold_first_call))
        results = {2: _Worker(second).outcome(), 1: first.outcome()}
        assert first_inside.is_set() and second_starting.is_set()
        for seed in (1, 2):
            assert max_diff(results[seed], expected[seed]) == 0.0, f"seed {seed}"
        assert handle.stats.pipeline_calls == 4
        assert handle.stats.last_call == [step % 3 == 0 for step in range(10)]


def test_a_call_from_inside_a_call_raises_and_leaves_the_handle_usable(sd_pipe):
    with accelerated(sd_pipe, cache_interval=3, compile=False) as handle:
        expected = latents(sd_pipe)

        def call_again(pipe, step, timestep, tensors):
            pipe("nested", num_inference_steps=2, output_type="latent")
            return {}

        with pytest.raises(fastcache.ReentrantCallError, match="called from inside one of its own calls"):
            latents(sd_pipe, callback_on_step_end=call_again)
        assert max_diff(latents(sd_pipe), expected) == 0.0
        assert handle.stats.last_call == [step % 3 == 0 for step in range(10)]


def test_disable_from_another_thread_waits_for_the_call_under_way(sd_pipe):
    handle = fastcache.accelerate(sd_pipe, cache_interval=3, compile=False)
    try:
        expected = latents(sd_pipe, seed=1)
        call_inside = threading.Event()

        def hold(pipe, step, timestep, tensors):
            if step == 1:
                call_inside.set()
                time.sleep(0.5)  # disable() is now waiting, or would be freeing the graphs
            return {}

        caller = _Worker(lambda: latents(sd_pipe, seed=1, callback_on_step_end=hold))
        assert call_inside.wait(timeout=60)
        disabler = _Worker(handle.disable)
        disabler.join(timeout=0.2)
        assert disabler.is_alive() and handle.enabled, "disable() did not wait for the call"
        assert max_diff(caller.outcome(), expected) == 0.0
        disabler.outcome()
        assert not handle.enabled
        assert_untouched(sd_pipe)
    finally:
        handle.disable()


def test_a_call_from_another_thread_waits_for_warmup_to_finish(sd_pipe):
    """Warm-up forces its own schedule until it returns; a call queued meanwhile must not run with it.

    The handle's dispatcher is made to pause just as warm-up lifts its schedule (after its own
    pipeline call): a call that got in there would take the warm-up's schedule (refresh at step 0
    only) and give other latents.
    """
    with accelerated(sd_pipe, cache_interval=3, compile=False) as handle:
        expected = latents(sd_pipe, seed=1)
        dispatcher, lifting = handle._dispatcher, threading.Event()
        force = dispatcher.force

        def slow_lift(schedule):
            if schedule is None:
                lifting.set()
                time.sleep(0.5)
            force(schedule)

        dispatcher.force = slow_lift
        try:
            warming = _Worker(lambda: handle.warmup(height=128, width=128))
            assert lifting.wait(timeout=60)
            caller = _Worker(lambda: latents(sd_pipe, seed=1))
            warming.outcome()
            actual = caller.outcome()
        finally:
            dispatcher.force = force
        assert max_diff(actual, expected) == 0.0
        assert handle.stats.last_call == [step % 3 == 0 for step in range(10)]


# Each runtime, in strict serving where it compiles: a warm-up in one autograd state must serve
# calls made in the other with the same latents and no compilation.
INFERENCE_MODE_RUNTIMES = {
    "eager split": dict(compile=False),
    "emulated graphs": dict(compile=False, emulate_graphs=True),
    "dynamo": dict(compile_backend="eager", strict=True),
    "dynamo + emulated graphs": dict(compile_backend="eager", emulate_graphs=True, strict=True),
}


@pytest.fixture(scope="module")
def deepcache_6_steps(sd_pipe):
    return deepcache_latents(sd_pipe, 3, 0, steps=6)


@pytest.mark.covers("torch.inference_mode around warmup or calls", "= DeepCache")
@pytest.mark.covers("torch.inference_mode around warmup or calls", "compiled (dynamo, no graph breaks)")
@pytest.mark.covers("torch.inference_mode around warmup or calls", "emulated CUDA Graphs")
@pytest.mark.parametrize("warm_in_inference_mode", [True, False], ids=["warm-inference", "warm-no-grad"])
@pytest.mark.parametrize("runtime", sorted(INFERENCE_MODE_RUNTIMES))
def test_torch_inference_mode_in_warmup_or_serving_changes_nothing(sd_pipe, deepcache_6_steps, runtime,
                                                                   warm_in_inference_mode):
    """Servers often run under torch.inference_mode. Before the fix, a warm-up under it made the
    static buffers inference tensors (a later call outside it failed writing them) and compiled
    graphs a call outside it did not match (strict serving refused the recompile)."""
    expected = deepcache_6_steps
    with accelerated(sd_pipe, cache_interval=3, **INFERENCE_MODE_RUNTIMES[runtime]) as handle:
        with torch.inference_mode(warm_in_inference_mode):
            handle.warmup(height=128, width=128)
        compilations = handle.compilations
        for serve_in_inference_mode in (not warm_in_inference_mode, warm_in_inference_mode):
            with torch.inference_mode(serve_in_inference_mode):
                actual = latents(sd_pipe, steps=6)
            assert max_diff(actual, expected) <= 1e-5, f"served in inference mode: {serve_in_inference_mode}"
        assert handle.compilations == compilations
        assert handle.stats.cached_steps > 0


ATTACH_IMAGE = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))


def _img2img_latents(pipe, seed=0):
    return latents(pipe, seed=seed, image=ATTACH_IMAGE, strength=0.7)


@pytest.mark.covers("attach(): a second pipeline sharing the U-Net (from_pipe)", "= DeepCache")
@pytest.mark.covers("attach(): a second pipeline sharing the U-Net (from_pipe)", "emulated CUDA Graphs")
def test_attached_pipeline_shares_graphs_and_re_arms_at_its_calls(any_pipe):
    """A text-to-image and an img2img pipeline on one U-Net, calls interleaved: each equals
    DeepCache's helper on that pipeline alone, and the img2img calls reuse the shape's graphs."""
    from diffusers import AutoPipelineForImage2Image

    sd_pipe = any_pipe
    img2img = AutoPipelineForImage2Image.from_pipe(sd_pipe)
    assert img2img.unet is sd_pipe.unet
    expected_text = deepcache_latents(sd_pipe, 3, 0)
    expected_image = deepcache_latents(img2img, 3, 0, image=ATTACH_IMAGE, strength=0.7)
    with accelerated(sd_pipe, cache_interval=3, compile=False, emulate_graphs=True) as handle:
        with pytest.raises(AlreadyAcceleratedError, match=r"handle\.attach\(pipe\)"):
            fastcache.accelerate(img2img)
        handle.attach(img2img)
        assert max_diff(latents(sd_pipe), expected_text) <= 1e-5
        captures = handle._runner.captures
        for _ in range(2):  # the second time, its first step must refresh again
            assert max_diff(_img2img_latents(img2img), expected_image) <= 1e-5
            assert handle.stats.last_call == [step % 3 == 0 for step in range(7)]
        assert handle._runner.captures == captures, "img2img at the same shape captured new graphs"
        assert max_diff(latents(sd_pipe), expected_text) <= 1e-5
    assert_untouched(img2img)
    assert_untouched(sd_pipe)


def test_attach_refuses_what_it_cannot_share(sd_pipe):
    own_unet = StableDiffusionImg2ImgPipeline(**{**sd_pipe.components, "unet": copy.deepcopy(sd_pipe.unet)})
    with accelerated(sd_pipe, compile=False) as handle:
        with pytest.raises(UnsupportedPipelineError, match="shares this handle's U-Net"):
            handle.attach(own_unet)
        with pytest.raises(UnsupportedPipelineError, match="cannot be deep-copied"):
            copy.deepcopy(sd_pipe.unet)
        with pytest.raises(AlreadyAcceleratedError, match="already accelerated"):
            handle.attach(sd_pipe)
        other = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
        handle.attach(other)
        with pytest.raises(AlreadyAcceleratedError, match="already accelerated"):
            handle.attach(other)
    assert_untouched(other)


def test_a_unet_replaced_after_accelerate_is_accelerated_at_the_call(sd_pipe):
    """The next call accelerates the new U-Net (issue 13 item 8; it was refused before), with the
    images of accelerating it afresh; the previous U-Net gets its own forward back."""
    original, replacement = sd_pipe.unet, copy.deepcopy(sd_pipe.unet)
    with torch.no_grad():
        replacement.conv_out.weight.mul_(0.5)  # a "fine-tune"
    try:
        sd_pipe.unet = replacement
        with accelerated(sd_pipe, compile=False):
            expected = latents(sd_pipe, steps=3)
        sd_pipe.unet = original
        with accelerated(sd_pipe, compile=False):
            latents(sd_pipe, steps=3)
            sd_pipe.unet = replacement
            assert torch.equal(latents(sd_pipe, steps=3), expected)
            assert vars(original).get("forward") in (None, type(original).forward.__get__(original))
        assert_untouched(sd_pipe)
    finally:
        sd_pipe.unet = original
    assert_untouched(sd_pipe)


def test_pipelines_per_thread_with_their_own_schedulers_take_turns_once_attached(sd_pipe):
    """diffusers' suggested threading pattern (issue #1606): one pipeline per thread, sharing the
    modules, each with a copy of the scheduler. Attached, each thread's calls give its own result."""
    from diffusers import StableDiffusionPipeline

    workers = [StableDiffusionPipeline(**{**sd_pipe.components, "scheduler": copy.deepcopy(sd_pipe.scheduler)})
               for _ in range(2)]
    expected = deepcache_latents(sd_pipe, 3, 0, seed=4)
    with accelerated(sd_pipe, cache_interval=3, compile=False) as handle:
        for worker in workers:
            handle.attach(worker)
        threads = [_Worker(lambda worker=worker: [latents(worker, seed=4) for _ in range(2)]) for worker in workers]
        results = [thread.outcome() for thread in threads]
        assert handle.stats.pipeline_calls == 4
    for outputs in results:
        for output in outputs:
            assert max_diff(output, expected) <= 1e-5
    for worker in workers:
        assert_untouched(worker)


def test_the_handle_says_what_it_runs(sd_pipe):
    img2img = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    with accelerated(sd_pipe, cache_interval=2, cache_branch_id=1, compile=False) as handle:
        handle.attach(img2img)
        handle.warmup(height=128, width=128)
        assert repr(handle) == (
            "FastCache(StableDiffusionPipeline + StableDiffusionImg2ImgPipeline, cache_interval=2, "
            "cache_branch_id=1, runtime='eager', shapes=['batch 2, latents 4x16x16, float32 on cpu'], enabled=True)"
        )
