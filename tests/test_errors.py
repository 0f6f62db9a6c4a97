"""accelerate()'s errors: bad arguments, unsupported pipelines and inputs, compile and capture
failures; each leaves the pipeline untouched (or restored) and says what is allowed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

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


def test_compile_options_reach_the_backend(two_level_pipe):
    """Inductor options are handed to torch.compile (a recording backend sees them) and the result
    still equals DeepCache."""
    from torch._dynamo import register_backend

    seen: list[dict] = []

    @register_backend(name="fastcache_test_recording_backend")
    def recording_backend(graph, example_inputs, **kwargs):
        seen.append(kwargs)
        return graph.forward

    expected = deepcache_latents(two_level_pipe, 2, 0, steps=4)
    with accelerated(two_level_pipe, cache_interval=2, compile_backend="fastcache_test_recording_backend",
                     compile_options={"conv_1x1_as_mm": True}):
        assert max_diff(latents(two_level_pipe, steps=4), expected) <= 1e-5
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
