"""Threads and inference mode: calls from several threads take turns, a call inside a call
raises, disable()/warmup() wait for a call under way, inference mode shares graphs."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

import fastcache

from .helpers import Worker, accelerated, assert_untouched, deepcache_latents, latents, max_diff



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

        first = Worker(lambda: latents(sd_pipe, seed=1, callback_on_step_end=hold_first_call))
        results = {2: Worker(second).outcome(), 1: first.outcome()}
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

        caller = Worker(lambda: latents(sd_pipe, seed=1, callback_on_step_end=hold))
        assert call_inside.wait(timeout=60)
        disabler = Worker(handle.disable)
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
            warming = Worker(lambda: handle.warmup(height=128, width=128))
            assert lifting.wait(timeout=60)
            caller = Worker(lambda: latents(sd_pipe, seed=1))
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
def deepcache_6_steps(two_level_pipe):
    return deepcache_latents(two_level_pipe, 3, 0, steps=6)


@pytest.mark.covers("torch.inference_mode around warmup or calls", "= DeepCache")
@pytest.mark.covers("torch.inference_mode around warmup or calls", "compiled (dynamo, no graph breaks)")
@pytest.mark.covers("torch.inference_mode around warmup or calls", "emulated CUDA Graphs")
@pytest.mark.parametrize("warm_in_inference_mode", [True, False], ids=["warm-inference", "warm-no-grad"])
@pytest.mark.parametrize("runtime", sorted(INFERENCE_MODE_RUNTIMES))
def test_torch_inference_mode_in_warmup_or_serving_changes_nothing(two_level_pipe, deepcache_6_steps, runtime,
                                                                   warm_in_inference_mode):
    """Servers often run under torch.inference_mode. Before the fix, a warm-up under it made the
    static buffers inference tensors (a later call outside it failed writing them) and compiled
    graphs a call outside it did not match (strict serving refused the recompile)."""
    expected = deepcache_6_steps
    with accelerated(two_level_pipe, cache_interval=3, **INFERENCE_MODE_RUNTIMES[runtime]) as handle:
        with torch.inference_mode(warm_in_inference_mode):
            handle.warmup(height=128, width=128)
        compilations = handle.compilations
        for serve_in_inference_mode in (not warm_in_inference_mode, warm_in_inference_mode):
            with torch.inference_mode(serve_in_inference_mode):
                actual = latents(two_level_pipe, steps=6)
            assert max_diff(actual, expected) <= 1e-5, f"served in inference mode: {serve_in_inference_mode}"
        assert handle.compilations == compilations
        assert handle.stats.cached_steps > 0


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
        threads = [Worker(lambda worker=worker: [latents(worker, seed=4) for _ in range(2)]) for worker in workers]
        results = [thread.outcome() for thread in threads]
        assert handle.stats.pipeline_calls == 4
    for outputs in results:
        for output in outputs:
            assert max_diff(output, expected) <= 1e-5
    for worker in workers:
        assert_untouched(worker)
