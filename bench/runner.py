"""The benchmark loop: for every shape, every method, in one process on the same inputs.

Per method and shape, in this order:

1. ``enable`` (fastcache: accelerate + warmup), the allocator's cache emptied, and the first
   end-to-end call: time to first image, reported apart and never part of the timed runs;
2. ``runs`` timed end-to-end calls, then ``runs`` timed denoising-loop calls (peak CUDA memory,
   reserved and allocated, over both; on a CPU, tensor bytes of the second of two more untimed
   end-to-end calls; fastcache's own buffers from ``handle.memory()``);
3. ``runs`` more denoising-loop calls with every U-Net call timed by hooks (grouped by what it
   ran, where the method says: fastcache's refresh/cached and batch rows);
4. direct ``pipe.unet(...)`` calls with the pipeline's real inputs, each classified as full,
   refresh or cached by the method's own state (not for TGATE, which plans whole pipeline calls);
5. ``disable``, then a check that the pipeline is as built.

Quality compares the outputs of the timed calls with eager's (same seed, same prompt).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import metrics
from .env import load_average
from .floor import MatmulRate, dense_matmul_rate, shape_floor
from .methods import CACHED, FULL, REFRESH, CacheConfig, Method, Shape, is_restored, reference_kind
from .results import Agreement, LoopCalls, MethodResult, Quality, ShapeResult, StepTimes
from .timing import PeakMemory, TimingStats, release_cached_memory, repeat, synchronize, timed, timed_with_host
from .workload import UNetInputs, Workload


@dataclass
class Outputs:
    """What a method produced at one shape: images (N, H, W, 3) in [0, 1] and final latents."""

    images: np.ndarray
    latents: np.ndarray


@dataclass
class RunSettings:
    steps: int
    runs: int
    prompt: str
    seed: int
    guidance_scale: float
    step_calls: int  # direct U-Net calls per method: this many per refresh interval


_RATES: dict[tuple[str, str], MatmulRate] = {}


def matmul_rate(device: torch.device, dtype: torch.dtype) -> MatmulRate:
    """The dense matrix rate of this device and dtype, measured once per process."""
    key = (str(device), str(dtype))
    if key not in _RATES:
        _RATES[key] = dense_matmul_rate(device, dtype)
    return _RATES[key]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def compile_counters() -> dict[str, int]:
    """Inductor's FX-graph cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {name: int(inductor[name]) for name in ("fxgraph_cache_hit", "fxgraph_cache_miss")}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


@contextlib.contextmanager
def _quiet_fastcache() -> Iterator[None]:
    """Keep fastcache's one-time warnings (e.g. few steps) out of the timed direct U-Net calls."""
    logger = logging.getLogger("fastcache")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def time_steps(method: Method, pipe: Any, inputs: UNetInputs, device: torch.device, calls: int) -> StepTimes:
    """Time `calls` direct U-Net calls, one per step, and group them by what each call ran.

    Calls walk the scheduler's timesteps from the first, as a denoising loop does, and start a new
    pass (fastcache re-armed; DeepCache back at its first step) when they run out.
    """
    samples: dict[str, list[float]] = {FULL: [], REFRESH: [], CACHED: []}
    host: dict[str, list[float]] = {FULL: [], REFRESH: [], CACHED: []}
    pattern = []
    steps_per_loop = len(inputs.timesteps)
    with torch.no_grad(), _quiet_fastcache():
        for call in range(calls):
            index = call % steps_per_loop
            if index == 0:  # each pass over the timesteps starts like a denoising loop
                method.begin_direct_calls()
            host_s, seconds, _ = timed_with_host(lambda: inputs.call(pipe.unet, index), device)
            kind = method.last_call_kind()
            samples[kind].append(seconds)
            host[kind].append(host_s)
            pattern.append(kind)

    def stats(values: list[float]) -> TimingStats | None:
        return TimingStats.of(values) if values else None

    note = None if method.config is not None else "no caching: every call runs the whole U-Net"
    return StepTimes(stats(samples[FULL]), stats(samples[REFRESH]), stats(samples[CACHED]), pattern, note,
                     stats(host[FULL]), stats(host[REFRESH]), stats(host[CACHED]))


def time_loop_calls(method: Method, workload: Workload, device: torch.device, runs: int) -> LoopCalls:
    """`runs` extra denoising calls with every U-Net call timed by forward hooks (which sync the
    device around each call, so these runs are not the timed ones)."""
    unet = workload.pipe.unet
    starts: list[float] = []
    seconds: list[float] = []

    def before(module: Any, args: Any) -> None:
        synchronize(device)
        starts.append(time.perf_counter())

    def after(module: Any, args: Any, output: Any) -> None:
        synchronize(device)
        seconds.append(time.perf_counter() - starts[-1])

    calls: list[list[float]] = []
    loops: list[float] = []
    labels: list[str] | None = None
    hooks = [unet.register_forward_pre_hook(before), unet.register_forward_hook(after)]
    try:
        for _ in range(runs):
            starts.clear()
            seconds.clear()
            loop_s, _ = timed(workload.denoise, device)
            loops.append(loop_s)
            calls.append(list(seconds))
            labels = method.call_labels() or ["U-Net call"] * len(seconds)
    finally:
        for hook in hooks:
            hook.remove()
    assert labels is not None and all(len(run) == len(labels) for run in calls)
    groups: dict[str, list[float]] = {}
    for run in calls:
        for label, value in zip(labels, run):
            groups.setdefault(label, []).append(value)
    return LoopCalls(
        groups={label: TimingStats.of(values) for label, values in groups.items()}, labels=labels,
        per_call_median=[float(np.median(column)) for column in zip(*calls)],
        unet=TimingStats.of([sum(run) for run in calls]), loop=TimingStats.of(loops),
    )


def quality(actual: Outputs, reference: Outputs) -> Quality:
    return Quality(
        psnr=metrics.batch_mean(metrics.psnr, actual.images, reference.images),
        ssim=metrics.batch_mean(metrics.ssim, actual.images, reference.images),
        latent_rel_l2=metrics.relative_l2(actual.latents, reference.latents),
    )


def measure_method(
    method: Method, pipe: Any, workload: Workload, settings: RunSettings, device: torch.device,
    inputs_for_steps: Callable[[], UNetInputs],
) -> tuple[MethodResult, Outputs]:
    """Steps 1-5 of the module docstring for one method at one shape."""
    pipeline_class = type(pipe)
    counters_before = compile_counters()
    start = time.perf_counter()
    details = method.enable(pipe, workload.shape, workload.call_kwargs())
    try:
        synchronize(device)
        setup_s = time.perf_counter() - start
        release_cached_memory(device)  # what an earlier method left cached is not this one's
        first_s, _ = timed(workload.end_to_end, device)
        first_image_s = setup_s + first_s
        compile_cache = _delta(counters_before, compile_counters())
        memory = PeakMemory(device)
        memory.start()
        e2e, images = repeat(workload.end_to_end, device, settings.runs)
        denoise, latents = repeat(workload.denoise, device, settings.runs)
        peak = memory.read(replay=workload.end_to_end)
        details.update(method.memory_details())
        if peak.parts is not None:
            details["peak_memory_parts"] = peak.parts
        pattern = method.refresh_pattern()
        loop_calls = time_loop_calls(method, workload, device, settings.runs)
        per_interval = method.config.interval if method.config is not None else 1
        if method.config is not None and method.config.gate is not None:
            # TGATE plans whole pipeline calls (the batch halves at the gate): no direct U-Net calls.
            steps = StepTimes(note="TGATE: steps are not timed one by one (it runs through the pipeline call)")
        else:
            steps = time_steps(method, pipe, inputs_for_steps(), device, settings.step_calls * per_interval)
    finally:
        method.disable()
    restored = is_restored(pipe, pipeline_class)
    if not restored:
        raise RuntimeError(f"{method.label} did not restore the pipeline")
    outputs = Outputs(np.asarray(images, dtype=np.float64), latents.detach().double().cpu().numpy())
    result = MethodResult(
        method=method.kind, config=method.config.label if method.config else None, label=method.label,
        setup_s=setup_s, first_image_s=first_image_s, compile_cache=compile_cache, details=details,
        end_to_end=e2e, denoise=denoise, steps=steps, peak_reserved_bytes=peak.reserved,
        peak_allocated_bytes=peak.allocated, peak_memory_note=peak.note,
        restored=restored,
        outputs_finite=bool(np.isfinite(outputs.images).all() and np.isfinite(outputs.latents).all()),
        refresh_pattern=pattern, load_average=load_average(), loop_calls=loop_calls,
    )
    return result, outputs


def _closeness(dc_eager: Quality, fc_eager: Quality, fc_dc: Quality) -> float:
    nearest_to_eager = min(dc_eager.latent_rel_l2, fc_eager.latent_rel_l2)
    if fc_dc.latent_rel_l2 == 0.0:
        return math.inf
    return nearest_to_eager / fc_dc.latent_rel_l2


def measure_shape(
    pipe: Any, shape: Shape, methods: list[Method], settings: RunSettings, device: torch.device,
    samples: dict[str, np.ndarray] | None = None,
) -> ShapeResult:
    """All methods at one shape; fills `samples` (label -> first image) when given."""
    workload = Workload(pipe, shape, settings.steps, settings.prompt, settings.seed, settings.guidance_scale)
    workload.prepare()
    unet_inputs: list[UNetInputs] = []

    def inputs_for_steps() -> UNetInputs:
        # Captured once per shape, from the plain pipeline (the first method), then reused.
        if not unet_inputs:
            unet_inputs.append(workload.capture_unet_inputs())
        return unet_inputs[0]

    result = ShapeResult(shape.width, shape.height, shape.batch, unet_batch=0)
    outputs: dict[str, Outputs] = {}
    for method in methods:
        log(f"{shape.label}: {method.label}")
        measured, out = measure_method(method, pipe, workload, settings, device, inputs_for_steps)
        result.methods.append(measured)
        outputs[measured.label] = out
        if samples is not None:
            samples.setdefault(measured.label, out.images[0])
        log(f"{shape.label}: {method.label}: end-to-end median {measured.end_to_end.median:.4f} s, "
            f"denoise median {measured.denoise.median:.4f} s, first image {measured.first_image_s:.1f} s")
    result.unet_batch = int(unet_inputs[0].args[0].shape[0]) if unet_inputs else 0
    reference = outputs["eager"]
    eager = result.get("eager")
    for measured in result.methods:
        measured.quality_vs_eager = quality(outputs[measured.label], reference)
        measured.speedup_end_to_end = eager.end_to_end.median / measured.end_to_end.median
        measured.speedup_denoise = eager.denoise.median / measured.denoise.median
    if unet_inputs:
        captured = unet_inputs[0]
        context = captured.kwargs.get("encoder_hidden_states")
        text_length = int((context if context is not None else captured.args[2]).shape[1])
        result.floor = shape_floor(dict(pipe.unet.config), shape.height, shape.width, result.unet_batch,
                                   text_length, matmul_rate(device, pipe.unet.dtype), result.methods)
    configs = [m.config for m in result.methods if m.method == "fastcache"]
    for config in configs:
        dc, fc = result.get(f"{reference_kind(config)} {config}"), result.get(f"fastcache {config}")
        fc_dc = quality(outputs[fc.label], outputs[dc.label])
        assert dc.quality_vs_eager is not None and fc.quality_vs_eager is not None
        result.agreements.append(Agreement(
            config=str(config), fastcache_vs_deepcache=fc_dc, deepcache_vs_eager=dc.quality_vs_eager,
            fastcache_vs_eager=fc.quality_vs_eager,
            closeness_ratio=_closeness(dc.quality_vs_eager, fc.quality_vs_eager, fc_dc),
            speedup_end_to_end=dc.end_to_end.median / fc.end_to_end.median,
            speedup_denoise=dc.denoise.median / fc.denoise.median,
        ))
    return result


def parse_configs(text: str) -> list[CacheConfig]:
    configs = [CacheConfig.parse(part) for part in text.split(",") if part.strip()]
    if len({c.label for c in configs}) != len(configs):
        raise ValueError(f"duplicate configs in {text!r}")
    return configs
