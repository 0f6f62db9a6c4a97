"""Issue 13: a server's handle survives bad requests and never poisons the process.

Each test forces the situation the issue describes (thread interleavings through events, a failing
backend or capture, a small recompile limit, a replaced U-Net, diffusers hooks) and checks the
result against a reference: DeepCache's helper, the eager split, the plain pipeline or the same
handle's output before the event, with the stated tolerance. Dynamo runs use the "eager" backend
(tracing only; no inductor compile on two CPU cores) on the two-level SD pipeline (half the tiny
U-Net's trace): what is tested here is the runtime, not the U-Net's depth.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

import fastcache
from fastcache import runtime
from fastcache.errors import (
    CompileError,
    FastCacheError,
    HandleDisabledError,
    InvalidConfigError,
    InvalidInputError,
    ShapeLimitError,
    ShapeNotWarmedError,
    UnsupportedPipelineError,
)
from fastcache.schedule import make_schedule
from fastcache.tiny import tiny_sd_pipeline, tiny_sdxl_unet, two_level_sd_unet

from .helpers import Worker, accelerated, assert_close_relative, assert_untouched, deepcache_latents, latents, max_diff

# fastcache against DeepCache's helper (the same computation, other op order): 1e-5 relative.
DEEPCACHE_RTOL = 1e-5

RUNTIMES = {
    "eager": dict(compile=False),
    "emulated-graphs": dict(compile=False, emulate_graphs=True),
    "compiled": dict(compile_backend="eager"),
}


@pytest.fixture(scope="module")
def deepcache_4_steps(two_level_pipe):
    return deepcache_latents(two_level_pipe, 3, 0, steps=4)


# -- item 1: strict mode leaves torch's process-wide compiler state alone ---------------------------
def _stance() -> str:
    import torch._dynamo.eval_frame

    return torch._dynamo.eval_frame._stance.stance


def _hold_first_call(handle, which, hold):
    """Make the handle's first compiled `which` call run `hold()` inside fastcache's dynamo
    settings (where the old code had set the process-wide stance), just before the graph runs."""
    functions = handle._runner.compiled.functions
    original, held = functions[which], []

    def wrapper(*args):
        if not held:
            held.append(True)
            hold()
        return original(*args)

    functions[which] = wrapper


def test_strict_serving_leaves_another_threads_compiled_function_alone(two_level_pipe, deepcache_4_steps):
    """While a strict handle runs a warmed graph, an unrelated torch.compile function in another
    thread compiles and recompiles. Before the fix the strict handle had set the process-wide
    stance "fail_on_recompile", so the other thread's compile raised."""

    def unrelated(x):
        return x * 2 + 1

    compiled = torch.compile(unrelated, backend="eager", fullgraph=True, dynamic=False)
    try:
        with accelerated(two_level_pipe, cache_interval=3, compile_backend="eager", strict=True) as handle:
            handle.warmup(height=128, width=128)
            inside, other_done = threading.Event(), threading.Event()

            def hold():
                inside.set()
                assert other_done.wait(timeout=300)

            def other_thread():
                assert inside.wait(timeout=300)
                try:
                    return compiled(torch.zeros(2)), compiled(torch.zeros(3))  # a compile, then a recompile
                finally:
                    other_done.set()

            _hold_first_call(handle, "full", hold)
            other = Worker(other_thread)
            actual = latents(two_level_pipe, steps=4)
            first, second = other.outcome()
        assert torch.equal(first, torch.ones(2)) and torch.equal(second, torch.ones(3))
        assert_close_relative(actual, deepcache_4_steps, DEEPCACHE_RTOL)
        assert _stance() == "default"
    finally:
        torch.compiler.set_stance("default")  # the old code could leave it stuck: keep later tests clean


def test_two_strict_handles_in_two_threads_leave_torch_as_they_found_it(two_level_pipe, sdxl_pipe):
    """Handle A enters its strict call, then B; A's whole pipeline call ends, then B's. Before the
    fix B restored the stance A had set ("fail_on_recompile"), so it stayed set for good, and a
    new unrelated compiled function raised on its first call."""
    pipes = (two_level_pipe, sdxl_pipe)
    handles = [fastcache.accelerate(pipe, cache_interval=3, compile_backend="eager", strict=True) for pipe in pipes]
    try:
        for handle in handles:
            handle.warmup(height=128, width=128)
        expected = [latents(pipe, steps=4) for pipe in pipes]
        a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()

        def hold_a():
            a_inside.set()
            assert b_inside.wait(timeout=300)

        def hold_b():
            assert a_inside.wait(timeout=300)
            b_inside.set()
            assert a_done.wait(timeout=600)

        def run_a():
            try:
                return latents(two_level_pipe, steps=4)
            finally:
                a_done.set()

        _hold_first_call(handles[0], "full", hold_a)
        _hold_first_call(handles[1], "full", hold_b)
        threads = [Worker(run_a), Worker(lambda: latents(sdxl_pipe, steps=4))]
        actual = [thread.outcome() for thread in threads]
        for handle in handles:
            handle.disable()
        assert _stance() == "default"
        # torch < 2.13 keeps dynamo's settings process-wide: there fastcache raises the limit for good
        limit = 8 if runtime.dynamo_config_is_thread_local() else max(
            runtime.RECOMPILE_LIMIT, torch._dynamo.config.accumulated_recompile_limit)
        assert torch._dynamo.config.recompile_limit == limit and not torch._dynamo.config.error_on_recompile
        fresh = torch.compile(lambda x: x - 1, backend="eager", fullgraph=True, dynamic=False)
        assert torch.equal(fresh(torch.ones(2)), torch.zeros(2)) and torch.equal(fresh(torch.ones(3)), torch.zeros(3))
        for result, reference in zip(actual, expected):
            assert max_diff(result, reference) == 0.0
    finally:
        for handle in handles:
            handle.disable()
        torch.compiler.set_stance("default")


# -- item 2: a bad request is the caller's error ------------------------------------------------------
BAD_CALLS = {
    "prompt embeddings of another width": (
        dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 48), negative_prompt_embeds=torch.zeros(1, 77, 48)),
        r"48 wide; this U-Net's cross-attention takes 32",
    ),
    "float64 latents": (
        dict(latents=torch.zeros(1, 4, 16, 16, dtype=torch.float64)),
        r"fail in the plain \(eager\) U-Net too(.|\n)*float64",
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_CALLS))
@pytest.mark.parametrize("runtime_name", sorted(RUNTIMES))
def test_bad_inputs_raise_an_input_error_and_the_handle_keeps_serving(two_level_pipe, deepcache_4_steps, runtime_name, bad):
    """Before the fix, compiled and graph runtimes took these for compile failures: CompileError,
    and the handle disabled itself for good."""
    call, message = BAD_CALLS[bad]
    with accelerated(two_level_pipe, cache_interval=3, **RUNTIMES[runtime_name]) as handle:
        served = latents(two_level_pipe, steps=4)
        compilations = handle.compilations
        with pytest.raises(InvalidInputError, match=message):
            latents(two_level_pipe, steps=4, **call)
        assert handle.enabled and handle.runtime == runtime_name
        assert torch.equal(latents(two_level_pipe, steps=4), served)
        assert handle.compilations == compilations
    assert_close_relative(served, deepcache_4_steps, DEEPCACHE_RTOL)


_backend_calls: list[tuple[int, ...]] = []


def _backend_failing_on_8x8_latents(graph, example_inputs):
    """A compiler that crashes for 8x8 latents (64 px) and works for every other shape."""
    shapes = [tuple(t.shape) for t in example_inputs if torch.is_tensor(t) and t.dim() == 4]
    _backend_calls.append(len(shapes))
    if any(shape[1] == 4 and shape[-2:] == (8, 8) for shape in shapes):
        raise RuntimeError("simulated compiler crash at 8x8")
    return graph.forward


def test_a_compile_failure_at_a_new_shape_refuses_that_shape_only(two_level_pipe, deepcache_4_steps):
    """Before the fix the handle disabled itself: every later call ran plain diffusers."""
    from torch._dynamo import register_backend

    register_backend(_backend_failing_on_8x8_latents, name="fastcache_test_fails_on_8x8")
    with accelerated(two_level_pipe, cache_interval=3, compile_backend="fastcache_test_fails_on_8x8") as handle:
        served = latents(two_level_pipe, steps=4)
        compilations = handle.compilations
        with pytest.raises(CompileError, match=r"simulated compiler crash at 8x8(.|\n)*Only this shape is refused"):
            latents(two_level_pipe, steps=4, height=64, width=64)
        assert handle.enabled
        tried = len(_backend_calls)
        with pytest.raises(CompileError, match="earlier"):
            latents(two_level_pipe, steps=4, height=64, width=64)
        assert len(_backend_calls) == tried, "a shape that failed must not be compiled again at every call"
        assert torch.equal(latents(two_level_pipe, steps=4), served) and handle.compilations == compilations
    assert_close_relative(served, deepcache_4_steps, DEEPCACHE_RTOL)


def test_a_one_off_capture_failure_keeps_the_captured_shapes_and_warmup_retries(two_level_pipe, deepcache_4_steps,
                                                                               monkeypatch):
    from fastcache import graphs

    capture, failing = graphs.CapturedFunction.__init__, []

    def flaky_capture(self, function, pool, emulate):
        if failing:
            raise RuntimeError("simulated capture failure")
        capture(self, function, pool, emulate)

    monkeypatch.setattr(graphs.CapturedFunction, "__init__", flaky_capture)
    expected_64 = deepcache_latents(two_level_pipe, 3, 0, steps=4, height=64, width=64)
    with accelerated(two_level_pipe, cache_interval=3, compile=False, emulate_graphs=True) as handle:
        served = latents(two_level_pipe, steps=4)
        captures = handle._runner.captures
        failing.append(True)
        with pytest.raises(CompileError, match="simulated capture failure(.|\n)*Only this shape is refused"):
            latents(two_level_pipe, steps=4, height=64, width=64)
        assert handle.enabled and handle._runner.captures == captures
        assert torch.equal(latents(two_level_pipe, steps=4), served)
        failing.clear()  # the failure was a one-off: warmup() at that shape tries again
        handle.warmup(height=64, width=64)
        actual_64 = latents(two_level_pipe, steps=4, height=64, width=64)
    assert_close_relative(served, deepcache_4_steps, DEEPCACHE_RTOL)
    assert_close_relative(actual_64, expected_64, DEEPCACHE_RTOL)


# -- item 3: the recompile limit -------------------------------------------------------------------
def test_shapes_past_the_recompile_limit_run_on_the_eager_split(two_level_pipe, monkeypatch, caplog):
    """Before the fix the shape past the limit raised CompileError and the handle disabled itself."""
    monkeypatch.setattr(runtime, "RECOMPILE_LIMIT", 2)
    sizes = (64, 96, 128)
    with accelerated(two_level_pipe, cache_interval=3, compile=False):
        eager = {size: latents(two_level_pipe, steps=4, height=size, width=size) for size in sizes}
    with accelerated(two_level_pipe, cache_interval=3, compile_backend="eager") as handle:
        served = {size: latents(two_level_pipe, steps=4, height=size, width=size) for size in sizes[:2]}
        compilations = handle.compilations
        with caplog.at_level(logging.WARNING, logger="fastcache"):
            past = [latents(two_level_pipe, steps=4, height=128, width=128) for _ in range(2)]
        assert caplog.text.count("runs on the eager split") == 1
        assert handle.eager_shapes == ("batch 2, latents 4x16x16, float32 on cpu",)
        assert handle.compilations == compilations
        for size in sizes[:2]:  # the warmed shapes keep their graphs
            assert torch.equal(latents(two_level_pipe, steps=4, height=size, width=size), served[size])
        with pytest.raises(ShapeLimitError, match=r"RECOMPILE_LIMIT(.|\n)*prepared shapes keep their graphs"):
            handle.warmup(height=80, width=80)
        with pytest.raises(ShapeLimitError, match="runs on the eager split"):
            handle.warmup(height=128, width=128)
        assert handle.enabled and handle.compilations == compilations
    for result in past:
        assert max_diff(result, eager[128]) == 0.0
    for size in sizes[:2]:
        assert_close_relative(served[size], eager[size], 1e-5)


# -- item 4: schedule and other arguments, checked at accelerate --------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(schedule="quadratic", power=math.inf), r"power must be a finite number in \(1, 10\]"),
        (dict(schedule="quadratic", power=math.nan), r"power must be a finite number"),
        (dict(schedule="quadratic", power=True), r"power must be a finite number"),
        (dict(schedule="quadratic", center=True), r"center must be an int >= 0"),
        (dict(center=2.5), r"center must be an int >= 0"),
        (dict(schedule=None), r"schedule must be 'uniform', 'quadratic' or a non-empty list"),
        (dict(schedule=5), r"schedule must be 'uniform', 'quadratic' or a non-empty list"),
        (dict(compile_backend="nonexistent"), r"unknown compile_backend 'nonexistent'(.|\n)*inductor"),
    ],
)
def test_bad_arguments_raise_invalid_config_before_touching_the_pipeline(two_level_pipe, options, message):
    with pytest.raises(InvalidConfigError, match=message):
        fastcache.accelerate(two_level_pipe, **options)
    assert_untouched(two_level_pipe)


def test_an_infinite_power_is_refused_instead_of_hanging():
    with pytest.raises(InvalidConfigError, match="power"):
        make_schedule("quadratic", 3, 15, math.inf).is_refresh(1, 20)


def test_explicit_refresh_steps_past_the_call_are_warned_about(two_level_pipe, caplog):
    with accelerated(two_level_pipe, schedule=[1000], compile=False) as handle:
        with caplog.at_level(logging.WARNING, logger="fastcache"):
            for _ in range(2):
                latents(two_level_pipe, steps=4)
        assert caplog.text.count("refresh step(s) [1000] are past the 4 steps of this call") == 1
        assert handle.stats.last_call == [True, False, False, False]
    caplog.clear()
    with accelerated(two_level_pipe, schedule=[2], compile=False) as handle:
        with caplog.at_level(logging.WARNING, logger="fastcache"):
            latents(two_level_pipe, steps=4)
        assert "past the" not in caplog.text and handle.stats.last_call == [True, False, True, False]


# -- item 5: a direct U-Net call from another thread during a pipeline call ----------------------------
@pytest.mark.parametrize("runtime_name", ["eager", "emulated-graphs"])
def test_a_direct_unet_call_from_another_thread_waits_for_the_pipeline_call(two_level_pipe, runtime_name):
    """The pipeline call stops in a step callback until the other thread is calling ``pipe.unet``;
    before the fix that call ran in the middle, sharing the step counter and kept features."""
    generator = torch.Generator().manual_seed(3)
    args = (torch.randn(2, 4, 16, 16, generator=generator), 500, torch.randn(2, 77, 32, generator=generator))
    with accelerated(two_level_pipe, cache_interval=3, **RUNTIMES[runtime_name]):
        expected = latents(two_level_pipe, seed=1, steps=6)
        in_step, calling, overlapped = threading.Event(), threading.Event(), []

        def hold(pipe, step, timestep, tensors):
            if step == 1:
                in_step.set()
                assert calling.wait(timeout=120)
                time.sleep(0.3)  # the direct call now waits for the lock, or would have run
                overlapped.append(not direct.is_alive())
            return {}

        def direct_call():
            assert in_step.wait(timeout=120)
            calling.set()
            return two_level_pipe.unet(*args).sample

        direct = Worker(direct_call)
        actual = latents(two_level_pipe, seed=1, steps=6, callback_on_step_end=hold)
        noise = direct.outcome()
    with torch.no_grad():
        reference = two_level_pipe.unet(*args).sample  # plain diffusers (disabled)
    assert overlapped == [False], "the direct U-Net call ran in the middle of the pipeline call"
    assert max_diff(actual, expected) == 0.0
    # It followed another thread's pipeline call: it starts afresh, a refresh (the full U-Net).
    assert max_diff(noise, reference) <= 1e-6


# -- item 6: every error a FastCacheError; strict honoured without compile ----------------------------
def test_a_disabled_handle_raises_a_fastcache_error(two_level_pipe):
    handle = fastcache.accelerate(two_level_pipe, compile=False)
    handle.disable()
    with pytest.raises(HandleDisabledError, match="disabled"):
        handle.warmup(height=64, width=64)
    with pytest.raises(HandleDisabledError, match="disabled"):
        handle.attach(StableDiffusionImg2ImgPipeline(**two_level_pipe.components))
    with pytest.raises(HandleDisabledError, match="disabled"):
        handle.reset()
    assert handle.memory().total == 0  # still answers: nothing held
    assert issubclass(HandleDisabledError, FastCacheError) and issubclass(HandleDisabledError, RuntimeError)
    assert_untouched(two_level_pipe)


def test_strict_is_honoured_without_compile(two_level_pipe, deepcache_4_steps):
    """Before the fix strict=True with compile=False was silently ignored."""
    with accelerated(two_level_pipe, cache_interval=3, compile=False, strict=True) as handle:
        with pytest.raises(ShapeNotWarmedError, match="no graph was warmed up for batch 2, latents 4x16x16"):
            latents(two_level_pipe, steps=4)
        handle.warmup(height=128, width=128)
        actual = latents(two_level_pipe, steps=4)
        with pytest.raises(ShapeNotWarmedError, match=r"4x8x8(.|\n)*warmed shapes: batch 2, latents 4x16x16"):
            latents(two_level_pipe, steps=2, height=64, width=64)
        # a warmed size in another dtype: the advice is about the dtype, not about warming a size
        with pytest.raises(ShapeNotWarmedError, match="latents are float64 and every warmed shape's float32: "
                                                      "plain diffusers fails"):
            latents(two_level_pipe, steps=2, latents=torch.zeros(1, 4, 16, 16, dtype=torch.float64))
        assert handle.enabled
    assert_close_relative(actual, deepcache_4_steps, DEEPCACHE_RTOL)


def test_strict_on_a_torch_with_process_wide_dynamo_settings_warns_once(monkeypatch, caplog):
    """Below torch 2.13 dynamo's settings are process-wide, so strict serving cannot refuse a
    recompilation: said once, not on every call. Dynamo's recompile limit is raised once for the
    process to what 2.13 gets per call (its default, 8, failed the 9th shape of a process)."""
    import torch._dynamo

    monkeypatch.setattr(runtime, "dynamo_config_is_thread_local", lambda: False)
    runtime._warn_strict_is_weaker.cache_clear()
    runtime._raise_process_wide_recompile_limit.cache_clear()
    try:  # config.patch restores the limit (monkeypatch would delete the config entry: torch hides it)
        with caplog.at_level(logging.WARNING, logger="fastcache"), torch._dynamo.config.patch(recompile_limit=8):
            for fail_on_recompile in (True, True, False):
                with runtime.dynamo_policy(fail_on_recompile):
                    assert torch._dynamo.config.recompile_limit == max(
                        runtime.RECOMPILE_LIMIT, torch._dynamo.config.accumulated_recompile_limit)
    finally:
        runtime._warn_strict_is_weaker.cache_clear()
        runtime._raise_process_wide_recompile_limit.cache_clear()
    messages = [r.getMessage() for r in caplog.records]
    (warning,) = [m for m in messages if "strict=True on torch" in m]
    assert "recompilation of a warmed shape" in warning and "is not refused" in warning
    (raised,) = [m for m in messages if "raised torch._dynamo.config.recompile_limit" in m]
    assert "from 8 to" in raised


# -- item 8: a replaced U-Net ---------------------------------------------------------------------------
def _has_own_forward(unet) -> bool:
    """No instance forward, or the class's own (what another tool's undo may leave): as helpers'
    assert_untouched judges it."""
    forward = vars(unet).get("forward")
    return forward is None or forward == type(unet).forward.__get__(unet)


def _replacement_unet(sample_size: int) -> torch.nn.Module:
    """Another U-Net of the same architecture (other random weights, possibly another sample size)."""
    torch.manual_seed(7)
    return two_level_sd_unet(sample_size=sample_size).eval()


@pytest.mark.parametrize("runtime_name", sorted(RUNTIMES))
def test_a_replaced_unet_gives_the_images_of_accelerating_it_afresh(two_level_pipe, runtime_name):
    """``pipe.unet = other`` (sample size 8: the default call becomes 64 px). Before the fix the next
    call raised."""
    original, replacement = two_level_pipe.unet, _replacement_unet(sample_size=8)
    options = dict(cache_interval=3, **RUNTIMES[runtime_name])
    try:
        two_level_pipe.unet = replacement
        with accelerated(two_level_pipe, **options):
            expected = latents(two_level_pipe, steps=4)
        two_level_pipe.unet = original
        with accelerated(two_level_pipe, **options) as handle:
            before = latents(two_level_pipe, steps=4)
            two_level_pipe.unet = replacement
            actual = latents(two_level_pipe, steps=4)
            assert _has_own_forward(original), "the previous U-Net must get its own forward back"
            assert two_level_pipe.unet.forward.__self__ is handle
        assert_untouched(two_level_pipe)
    finally:
        two_level_pipe.unet = original
    assert actual.shape == (1, 4, 8, 8) and before.shape == (1, 4, 16, 16)
    assert max_diff(actual, expected) == 0.0


def test_reset_accelerates_a_replaced_unet_for_a_custom_loop(two_level_pipe):
    """A custom loop calls ``pipe.unet`` directly: reset() adopts the replacement, so the loop's
    calls run fastcache on it, as a handle made afresh for it does."""
    original, replacement = two_level_pipe.unet, _replacement_unet(sample_size=16)
    generator = torch.Generator().manual_seed(5)
    args = (torch.randn(2, 4, 16, 16, generator=generator), 500, torch.randn(2, 77, 32, generator=generator))

    def loop(handle):
        handle.reset()
        return [two_level_pipe.unet(*args).sample for _ in range(3)]

    try:
        two_level_pipe.unet = replacement
        with accelerated(two_level_pipe, cache_interval=2, compile=False) as handle:
            expected = loop(handle)
        two_level_pipe.unet = original
        with accelerated(two_level_pipe, cache_interval=2, compile=False) as handle:
            loop(handle)
            two_level_pipe.unet = replacement
            actual = loop(handle)
            assert handle.stats.last_call[-3:] == [True, False, True]
            assert _has_own_forward(original)
    finally:
        two_level_pipe.unet = original
    for result, reference in zip(actual, expected):
        assert max_diff(result, reference) == 0.0


def test_a_replaced_unet_in_strict_mode_is_prepared_for_the_served_shapes_only(two_level_pipe):
    original, replacement = two_level_pipe.unet, _replacement_unet(sample_size=16)
    try:
        two_level_pipe.unet = replacement
        with accelerated(two_level_pipe, cache_interval=3, compile=False, emulate_graphs=True):
            expected = latents(two_level_pipe, steps=4)
        two_level_pipe.unet = original
        with accelerated(two_level_pipe, cache_interval=3, compile=False, emulate_graphs=True, strict=True) as handle:
            handle.warmup(height=128, width=128)
            two_level_pipe.unet = replacement
            actual = latents(two_level_pipe, steps=4)
            with pytest.raises(ShapeNotWarmedError, match="4x8x8"):
                latents(two_level_pipe, steps=2, height=64, width=64)
    finally:
        two_level_pipe.unet = original
    assert max_diff(actual, expected) == 0.0


def test_a_replacement_that_cannot_be_accelerated_is_refused_and_changes_nothing(sd_pipe):
    original = sd_pipe.unet
    replacement = tiny_sdxl_unet()  # 9 branches: branch 11 does not exist there
    with accelerated(sd_pipe, cache_interval=3, cache_branch_id=11, compile=False) as handle:
        expected = latents(sd_pipe, steps=3)
        try:
            sd_pipe.unet = replacement
            with pytest.raises(FastCacheError, match=r"unet was replaced(.|\n)*cannot be accelerated(.|\n)*0\.\.8"):
                latents(sd_pipe, steps=3)
            assert _has_own_forward(replacement)
        finally:
            sd_pipe.unet = original
        assert handle.enabled and torch.equal(latents(sd_pipe, steps=3), expected)


# -- item 10: diffusers model hooks -------------------------------------------------------------------
@pytest.fixture(scope="module")
def casting_pipe():
    """A tiny SD pipeline whose U-Net stores its weights in fp8 and computes in fp32."""
    pipe = tiny_sd_pipeline()
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return pipe


@pytest.mark.parametrize("runtime_name", ["emulated-graphs", "compiled"])
def test_layerwise_casting_is_refused_where_graphs_would_bake_it_in(casting_pipe, runtime_name):
    """Before the fix emulated graphs failed at the first call (a dtype error) and CUDA Graphs
    would have replayed stale weight storage."""
    with pytest.raises(UnsupportedPipelineError, match=r"layerwise_casting(.|\n)*compile=False"):
        fastcache.accelerate(casting_pipe, **RUNTIMES[runtime_name])
    assert_untouched(casting_pipe)


def test_layerwise_casting_runs_exactly_on_the_eager_split(casting_pipe):
    expected = deepcache_latents(casting_pipe, 3, 0, steps=4)
    plain = latents(casting_pipe, steps=4)
    with accelerated(casting_pipe, cache_interval=3, compile=False) as handle:
        actual = latents(casting_pipe, steps=4)
        assert handle.stats.cached_steps > 0
    with accelerated(casting_pipe, cache_interval=1, compile=False):
        uncached = latents(casting_pipe, steps=4)
    assert_close_relative(actual, expected, DEEPCACHE_RTOL)
    assert max_diff(uncached, plain) == 0.0
    assert_untouched(casting_pipe)


def test_hooks_added_after_accelerate_are_refused_at_the_next_call():
    pipe = tiny_sd_pipeline()
    with accelerated(pipe, cache_interval=3, compile=False, emulate_graphs=True) as handle:
        latents(pipe, steps=3)
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        with pytest.raises(UnsupportedPipelineError, match="layerwise_casting"):
            latents(pipe, steps=3)
        assert handle.enabled


def test_group_offloading_is_refused_in_every_runtime():
    pipe = tiny_sd_pipeline()
    pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
    with pytest.raises(UnsupportedPipelineError, match="group_offloading"):
        fastcache.accelerate(pipe, compile=False)
    assert_untouched(pipe)
