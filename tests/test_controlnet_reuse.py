"""`controlnet_reuse=True`: the ControlNet runs on refresh steps only; cached steps replay its residuals.

The reference is independent of fastcache: DeepCache 0.1.1's helper on the U-Net, plus a ControlNet
wrapper written here that counts the pipeline's ControlNet calls, runs the ControlNet on DeepCache's
refresh steps (step % interval == 0; one call per step with DDIM and Euler) and replays those
residuals on the other steps when the conditioning scale is the refresh step's (else runs it).
The tiny ControlNets have random output convolutions (see test_controlnet.py), so residuals move
the latents by several units: a residual from the wrong step fails the 1e-5 bound, and the first
test checks that reuse does change the images (the reference is not vacuous).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import diffusers
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline

import fastcache
from fastcache.tiny import tiny_controlnet
from fastcache.unet_split import unet_layout

from .helpers import accelerated, assert_untouched, control_image, controlnet_pipeline, deepcache_latents, latents, max_diff

TOLERANCE = 1e-5  # float32 latents of magnitude ~40: the bound test_controlnet.py uses against DeepCache
INTERVAL = 3

# The support table's row (docs/support.md).
REUSE_ROW = "controlnet_reuse=True (reference: DeepCache fed the residuals of the latest refresh)"



@pytest.fixture(scope="module", params=["sd", "sdxl", "sd-multi"])
def controlnet_pipe(request):
    return controlnet_pipeline(request.param)


def _nets(pipe: Any) -> list[Any]:
    return list(getattr(pipe.controlnet, "nets", [pipe.controlnet]))


def _assert_controlnet_clean(pipe: Any) -> None:
    assert "forward" not in vars(pipe.controlnet), "controlnet.forward still patched"
    for net in _nets(pipe):
        assert "forward" not in vars(net)


@contextlib.contextmanager
def replayed_controlnet(pipe: Any, interval: int) -> Iterator[dict[str, int]]:
    """The reference ControlNet: runs on steps 0, interval, ...; replays their output otherwise.

    Counts calls from 0 per pipeline call (``counts["calls"]`` is reset by the caller). On a
    non-refresh step it runs the ControlNet anyway when the conditioning scale differs from the
    refresh step's. Installed as an instance ``forward`` (test code; removed on exit).
    """
    controlnet = pipe.controlnet
    run = type(controlnet).forward.__get__(controlnet)
    counts = {"calls": 0, "runs": 0}
    stored: dict[str, Any] = {}

    def forward(*args: Any, **kwargs: Any) -> Any:
        step = counts["calls"]
        counts["calls"] += 1
        scale = kwargs["conditioning_scale"]
        if step % interval == 0 or stored.get("scale") != scale:
            down, mid = run(*args, **kwargs)
            counts["runs"] += 1
            if step % interval == 0:
                stored.update(scale=scale, down=[t.clone() for t in down], mid=mid.clone())
            return down, mid
        return list(stored["down"]), stored["mid"]

    controlnet.forward = forward
    try:
        yield counts
    finally:
        del controlnet.forward


def reference_latents(pipe: Any, branch: int, interval: int = INTERVAL, **kwargs: Any) -> torch.Tensor:
    with replayed_controlnet(pipe, interval):
        return deepcache_latents(pipe, interval, branch, **kwargs)


@contextlib.contextmanager
def traced(pipe: Any, handle: fastcache.FastCache) -> Iterator[list[str]]:
    """Events in order: "C" per ControlNet run (each net's conv_in), "R"/"c" per U-Net decision.

    Also checks on every U-Net call that `peek` (asked just before) agrees with `next_call`.
    """
    events: list[str] = []
    dispatcher = handle._dispatcher
    next_call = dispatcher.next_call

    def checked(scheduler: Any, key: Any) -> bool:
        predicted = dispatcher.peek(scheduler, key)
        assert dispatcher.peek(scheduler, key) == predicted, "peek changed state"
        decision = next_call(scheduler, key)
        assert predicted == decision, f"peek said {predicted}, next_call {decision} at U-Net call {len(events)}"
        events.append("R" if decision else "c")
        return decision

    hooks = [net.conv_in.register_forward_hook(lambda *_: events.append("C")) for net in _nets(pipe)]
    dispatcher.next_call = checked
    try:
        yield events
    finally:
        del dispatcher.next_call
        for hook in hooks:
            hook.remove()


def _expected_events(decisions: list[bool], nets: int) -> str:
    return "".join(("C" * nets + "R") if refresh else "c" for refresh in decisions)


@pytest.mark.covers(REUSE_ROW, "= DeepCache")
def test_reuse_equals_deepcache_with_replayed_residuals(controlnet_pipe):
    call = controlnet_pipe.control_kwargs
    deepest = unet_layout(controlnet_pipe.unet).num_branches - 1
    for branch in (0, deepest):
        expected = reference_latents(controlnet_pipe, branch, **call)
        with accelerated(controlnet_pipe, cache_interval=INTERVAL, cache_branch_id=branch, compile=False,
                         controlnet_reuse=True):
            actual = latents(controlnet_pipe, **call)
        assert max_diff(actual, expected) <= TOLERANCE, f"branch {branch}"
    without_reuse = deepcache_latents(controlnet_pipe, INTERVAL, deepest, **call)
    assert max_diff(actual, without_reuse) > 0.01, "reuse changed nothing: the reference would be vacuous"


def test_controlnet_runs_exactly_on_refresh_steps(controlnet_pipe):
    call = controlnet_pipe.control_kwargs
    nets = len(_nets(controlnet_pipe))
    with accelerated(controlnet_pipe, cache_interval=INTERVAL, compile=False, controlnet_reuse=True) as fc:
        for _ in range(2):  # the second call must start with a refresh, not with the first call's residuals
            with traced(controlnet_pipe, fc) as events:
                latents(controlnet_pipe, **call)
            assert fc.stats.last_call == [step % INTERVAL == 0 for step in range(10)]
            assert "".join(events) == _expected_events(fc.stats.last_call, nets)
    _assert_controlnet_clean(controlnet_pipe)


@pytest.mark.covers(REUSE_ROW, "= DeepCache")
@pytest.mark.parametrize("variant", ["guess_mode", "guidance_end", "no_cfg"])
def test_reuse_rules_per_step_arguments(controlnet_pipe, variant):
    """guess_mode (residuals concatenated after zeros), a conditioning scale that drops to 0 after
    control_guidance_end (the ControlNet runs until the next refresh at the new scale), and no CFG."""
    call = dict(controlnet_pipe.control_kwargs)
    multi = isinstance(call["image"], list)
    call.update({
        "guess_mode": dict(guess_mode=True),
        "guidance_end": dict(control_guidance_end=[0.5, 0.5] if multi else 0.5),
        "no_cfg": dict(guidance_scale=1.0),
    }[variant])
    expected = reference_latents(controlnet_pipe, 0, **call)
    with accelerated(controlnet_pipe, cache_interval=INTERVAL, compile=False, controlnet_reuse=True) as fc:
        with traced(controlnet_pipe, fc) as events:
            actual = latents(controlnet_pipe, **call)
    assert max_diff(actual, expected) <= TOLERANCE
    runs = "".join(events).replace("C" * len(_nets(controlnet_pipe)), "C")
    if variant == "guidance_end":  # scale 1 on steps 0-4, 0 on 5-9; refreshes 0, 3, 6, 9
        assert runs == "CR" + "c" + "c" + "CR" + "c" + "Cc" + "CR" + "c" + "c" + "CR"
    else:
        assert runs == _expected_events(fc.stats.last_call, 1)


@pytest.mark.parametrize("path", [
    pytest.param("emulate_graphs", marks=pytest.mark.covers(REUSE_ROW, "emulated CUDA Graphs")),
    pytest.param("compile_backend_eager", marks=pytest.mark.covers(REUSE_ROW, "compiled (dynamo, no graph breaks)")),
])
def test_graph_paths_equal_eager_path(controlnet_pipe, path):
    call = controlnet_pipe.control_kwargs
    steps = 4 if path == "compile_backend_eager" else 10  # dynamo traces both graphs: keep it short
    with accelerated(controlnet_pipe, cache_interval=2, compile=False, controlnet_reuse=True):
        expected = latents(controlnet_pipe, steps=steps, **call)
    options = dict(compile=False, emulate_graphs=True) if path == "emulate_graphs" else dict(compile_backend="eager")
    with accelerated(controlnet_pipe, cache_interval=2, controlnet_reuse=True, **options) as fc:
        with traced(controlnet_pipe, fc) as events:
            actual = latents(controlnet_pipe, steps=steps, **call)
    assert max_diff(actual, expected) <= TOLERANCE
    assert "".join(events) == _expected_events(fc.stats.last_call, len(_nets(controlnet_pipe)))


@pytest.mark.parametrize("guess_mode", [False, True])
def test_safety_net_reruns_a_skipped_controlnet_before_a_refresh(controlnet_pipe, guess_mode, caplog):
    """Force the wrong guess: peek always predicts a cached call, so the ControlNet is skipped before
    the refreshes at steps 3, 6, 9 too; the U-Net call must run it then and use fresh residuals."""
    call = dict(controlnet_pipe.control_kwargs, guess_mode=guess_mode)
    expected = reference_latents(controlnet_pipe, 0, **call)
    with accelerated(controlnet_pipe, cache_interval=INTERVAL, compile=False, controlnet_reuse=True) as fc:
        fc._dispatcher.peek = lambda scheduler, key: False
        with caplog.at_level(logging.WARNING, logger="fastcache"):
            actual = latents(controlnet_pipe, **call)
        del fc._dispatcher.peek
    assert max_diff(actual, expected) <= TOLERANCE
    assert sum("turned out to be a refresh" in r.getMessage() for r in caplog.records) == 3


def test_edited_control_image_runs_the_controlnet(controlnet_pipe):
    """A callback that replaces the control image (or edits it in place) makes the next step run the
    ControlNet even when it is a cached step: the stored residuals were made from the old image."""
    if isinstance(controlnet_pipe.control_kwargs["image"], list):
        pytest.skip("the pipeline's callback image is one tensor per ControlNet; covered by the single cases")
    call = controlnet_pipe.control_kwargs
    nets = len(_nets(controlnet_pipe))

    def edit(pipe: Any, step: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if step == 0:
            return {"image": tensors["image"] * 0.5}  # a new tensor
        if step == 3:
            tensors["image"].mul_(0.5)  # in place: same storage, new version
        return {}

    with accelerated(controlnet_pipe, cache_interval=INTERVAL, compile=False, controlnet_reuse=True) as fc:
        with traced(controlnet_pipe, fc) as events:
            latents(controlnet_pipe, callback_on_step_end=edit, callback_on_step_end_tensor_inputs=["image"], **call)
    per_step = "".join(events).replace("C" * nets, "C")
    # Refreshes 0, 3, 6, 9. Steps 1-2 see the new image and 4-5 the edited one, not the refresh's.
    assert per_step == "CR" + "Cc" + "Cc" + "CR" + "Cc" + "Cc" + "CR" + "c" + "c" + "CR"


def test_disable_restores_controlnet_forward_exactly(controlnet_pipe):
    call = controlnet_pipe.control_kwargs
    expected = latents(controlnet_pipe, steps=3, **call)
    with accelerated(controlnet_pipe, cache_interval=INTERVAL, compile=False, controlnet_reuse=True):
        assert "forward" in vars(controlnet_pipe.controlnet)
    _assert_controlnet_clean(controlnet_pipe)
    assert max_diff(latents(controlnet_pipe, steps=3, **call), expected) == 0.0
    # Another tool's instance forward is wrapped, called, and put back as the same object.
    calls = []
    original = type(controlnet_pipe.controlnet).forward.__get__(controlnet_pipe.controlnet)

    def foreign(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    controlnet_pipe.controlnet.forward = foreign
    try:
        with accelerated(controlnet_pipe, cache_interval=INTERVAL, compile=False, controlnet_reuse=True):
            latents(controlnet_pipe, steps=4, **call)
        assert len(calls) == 2  # steps 0 and 3
        assert vars(controlnet_pipe.controlnet)["forward"] is foreign
    finally:
        del controlnet_pipe.controlnet.forward


def test_invalid_use_is_refused_before_any_change(sd_pipe, controlnet_pipe):
    with pytest.raises(fastcache.InvalidConfigError, match="needs a ControlNet pipeline.*StableDiffusionPipeline has no `controlnet`"):
        fastcache.accelerate(sd_pipe, compile=False, controlnet_reuse=True)
    assert_untouched(sd_pipe)
    with pytest.raises(fastcache.InvalidConfigError, match="controlnet_reuse must be True or False"):
        fastcache.accelerate(controlnet_pipe, compile=False, controlnet_reuse="yes")
    assert_untouched(controlnet_pipe)
    _assert_controlnet_clean(controlnet_pipe)


@pytest.mark.parametrize("scheduler", ["PNDM", "Heun", "DPM++SDE"])
def test_peek_agrees_with_next_call_on_special_schedulers(scheduler):
    """PNDM (a repeated timestep), Heun and DPM++ SDE (two U-Net calls per step), a quadratic
    schedule, and warm-up's forced schedule: peek (asked before the ControlNet and again before
    each U-Net call, in `traced`) agrees with next_call, and the ControlNet runs exactly before
    refreshes, i.e. before both evaluations of a refresh step."""
    from fastcache.tiny import tiny_sd_pipeline

    name, options = {
        "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
        "Heun": ("HeunDiscreteScheduler", {}),
        "DPM++SDE": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}),
    }[scheduler]
    base = tiny_sd_pipeline()
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=tiny_controlnet(base.unet))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **options)
    image = control_image()
    for schedule in ("uniform", "quadratic"):
        with accelerated(pipe, cache_interval=INTERVAL, schedule=schedule, center=3, compile=False,
                         controlnet_reuse=True) as fc:
            with traced(pipe, fc) as events:
                fc.warmup(image=image, num_inference_steps=4)
            assert "".join(events) == _expected_events(fc.stats.last_call, 1)
            with traced(pipe, fc) as events:
                latents(pipe, steps=8, image=image)
            assert "".join(events) == _expected_events(fc.stats.last_call, 1)
            assert not all(fc.stats.last_call) and any(fc.stats.last_call[1:])


def test_peek_changes_nothing_and_follows_shape_changes():
    from types import SimpleNamespace

    from fastcache.dispatch import StepDispatcher
    from fastcache.schedule import UniformSchedule

    dispatcher = StepDispatcher(UniformSchedule(4))
    scheduler = SimpleNamespace(num_inference_steps=8)
    out = []
    for key in ("a", "a", "b", "b", "a", "a"):
        predicted = [dispatcher.peek(scheduler, k) for k in ("a", "b", key)]
        decision = dispatcher.next_call(scheduler, key)
        assert predicted[-1] == decision
        out.append((predicted[:2], decision))
    assert [d for _, d in out] == [True, False, True, False, True, False]
    assert out[1][0] == [False, True]  # at step 1 a new shape would refresh
