"""Host time fastcache adds per U-Net call and per pipeline call, with the U-Net's own work removed.

    python -m bench host-overhead --presets sd15,sdxl

On a GPU a cached step is launch-bound: when the host takes longer to issue a step than the GPU
takes to run it, the GPU waits, and CUDA Graphs cannot help with host work done in Python. This
measures fastcache's share of that host work. The preset's U-Net is built on the meta device
(real module tree and shapes, no data), its pipeline call's inputs are meta tensors of the real
shapes (classifier-free guidance: U-Net batch 2), and the runner that would replay the graphs is
replaced (through ``FastCache(..., runner_factory=...)``) by one that returns a preallocated
output. What is left is fastcache's own Python: the argument checks, the inputs' normalisation and
shape key, the dispatcher, LoRA scale handling, the output wrapper, and per pipeline call the
model check (model_watch.py: a probe of what can change on sub-modules, plus counters that
diffusers' entry points and torch's registration hooks move). The full fingerprint is taken only
after one of them fired, and at every ``reset()`` of a custom loop: it is measured apart.

Not in these figures: the device work a CUDA Graph step launches per call (copies into the
static inputs, the replay, the output's clone), and the pipeline's own per-step work (scheduler
step, classifier-free guidance arithmetic); `bench run` reports each step's host time on the
device next to its wall time.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Hashable

import torch

from .env import environment
from .results import write_result_files
from .timing import repeat

DEFAULT_PRESETS = ("sd15", "sdxl")


@dataclass
class HostOverhead:
    """Medians over `repeats` measurements of one preset, on the host."""

    preset: str
    modules: int  # sub-modules the fingerprint walks
    tensors: int  # parameters and buffers whose storage it records
    fingerprint_ms: float  # one full model_fingerprint (after a change was seen, per reset())
    model_check_us: float  # the check per pipeline call when nothing changed (ModelWatch.changed)
    unet_call_after_reset_us: float  # one U-Net call in a pipeline call, or in a loop that calls reset()
    unet_call_unmanaged_us: float  # one U-Net call of a loop that never called reset() (checks the model)
    pipeline_call_ms: float  # fastcache's host work for one pipeline call of `steps` U-Net calls
    steps: int


class _HostOnlyPipeline:
    """The least `fastcache.accelerate` needs: a U-Net, a scheduler, and a call that runs `steps`
    U-Net calls with fixed inputs, as a pipeline's denoising loop would."""

    def __init__(self, unet: Any, scheduler: Any, inputs: tuple[Any, ...]) -> None:
        self.unet, self.scheduler, self.inputs = unet, scheduler, inputs

    def __call__(self, steps: int) -> None:
        for _ in range(steps):
            self.unet(*self.inputs[:3], added_cond_kwargs=self.inputs[3])


def _median_seconds(function: Callable[[], Any], repeats: int, inner: int) -> float:
    """Median over `repeats` of the mean time of `inner` calls (after one untimed call)."""
    function()

    def calls() -> None:
        for _ in range(inner):
            function()

    stats, _ = repeat(calls, torch.device("cpu"), repeats)
    return stats.median / inner


def _meta_inputs(unet: Any, preset: str) -> tuple[Any, ...]:
    """One U-Net call's arguments at the preset's default resolution, batch 2 (CFG), on meta."""
    from .configs import RESOLUTION

    config = unet.config
    latent = RESOLUTION[preset] // 8
    meta = dict(device="meta", dtype=torch.float16)
    sample = torch.empty(2, config.in_channels, latent, latent, **meta)
    context = torch.empty(2, 77, config.cross_attention_dim, **meta)
    added = None
    if config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.empty(2, 1280, **meta), "time_ids": torch.empty(2, 6, **meta)}
    return sample, torch.tensor(981, device="meta"), context, added


def measure(preset: str, steps: int, repeats: int) -> HostOverhead:
    import fastcache
    from diffusers import UNet2DConditionModel
    from fastcache.lora import model_fingerprint
    from fastcache.model_watch import ModelWatch
    from fastcache.runtime import Runner
    from fastcache.unet_call import StepInputs

    from .configs import scheduler, unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(preset))
    torch.nn.Module.to(unet, torch.float16)  # (ModelMixin.to warns about casting; nothing is loaded here)
    noise_scheduler = scheduler(preset)
    noise_scheduler.set_timesteps(steps)
    inputs = _meta_inputs(unet, preset)
    output = torch.empty_like(inputs[0])

    class ReturnsOutput(Runner):
        """Stands in for the graph replay: no device work at all."""

        def refresh(self, key: Hashable, step_inputs: StepInputs) -> torch.Tensor:
            return output

        def cached(self, key: Hashable, step_inputs: StepInputs) -> torch.Tensor:
            return output

    watch = ModelWatch(unet)
    try:
        check_s = _median_seconds(watch.changed, repeats, 200)
    finally:
        watch.close()
    pipe = _HostOnlyPipeline(unet, noise_scheduler, inputs)
    config = fastcache.FastCacheConfig.from_options(cache_interval=3, compile=False)
    handle = fastcache.FastCache(pipe, config, runner_factory=lambda split, config, device: ReturnsOutput())
    try:

        def unet_call() -> None:
            unet(*inputs[:3], added_cond_kwargs=inputs[3])

        fingerprint_s = _median_seconds(lambda: model_fingerprint(unet), repeats, 5)
        unmanaged_s = _median_seconds(unet_call, repeats, 5)  # a loop that never called reset()
        handle.reset()
        managed_s = _median_seconds(unet_call, repeats, 200)
        pipeline_s = _median_seconds(lambda: pipe(steps), repeats, 1)
    finally:
        handle.disable()
    return HostOverhead(
        preset=preset,
        modules=sum(1 for _ in unet.modules()),
        tensors=sum(1 for _ in unet.parameters()) + sum(1 for _ in unet.buffers()),
        fingerprint_ms=fingerprint_s * 1e3,
        model_check_us=check_s * 1e6,
        unet_call_after_reset_us=managed_s * 1e6,
        unet_call_unmanaged_us=unmanaged_s * 1e6,
        pipeline_call_ms=pipeline_s * 1e3,
        steps=steps,
    )


def markdown(meta: dict[str, Any], rows: list[HostOverhead]) -> str:
    env = meta["environment"]
    lines = [
        "# fastcache host overhead",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {env['device_name']}, {env['cpu_count']} cores, torch {env['versions']['torch']}, "
        f"diffusers {env['versions']['diffusers']}, Python {env['python']}; commit {env['git_commit']}"
        f"{' (fastcache/ modified)' if env['fastcache_dirty'] else ''}; load average {meta['load_average']} "
        f"at start, {meta['load_average_at_end']} at end; medians of {meta['repeats']} repeats.",
        "",
        "Host time fastcache itself adds, with the U-Net's work removed (meta-device U-Net, a runner "
        "that returns a preallocated output): see bench/host_overhead.py.",
        "",
        "| preset | modules | tensors | model check per pipeline call us | full fingerprint ms (after a "
        "change, reset()) | U-Net call us (pipeline / after reset()) | U-Net call us (loop without reset()) | "
        "pipeline call ms (check + steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.preset} | {row.modules} | {row.tensors} | {row.model_check_us:.1f} | {row.fingerprint_ms:.2f} | "
            f"{row.unet_call_after_reset_us:.1f} | {row.unet_call_unmanaged_us:.1f} | "
            f"{row.pipeline_call_ms:.2f} ({row.steps} steps) |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                        help="comma-separated presets whose U-Nets to measure (bench/configs.py)")
    parser.add_argument("--steps", type=int, default=50, help="U-Net calls per pipeline call")
    parser.add_argument("--repeats", type=int, default=20, help="measurements per figure (median)")
    parser.add_argument("--out", default=None, help="directory for the JSON and Markdown (default: print only)")


def main(args: argparse.Namespace, argv: list[str]) -> int:
    import logging

    logging.getLogger("fastcache").setLevel(logging.ERROR)  # the custom-loop warning, once
    started = time.time()
    meta = dict(
        command="python -m bench " + shlex.join(argv),
        environment=environment(torch.device("cpu")),
        load_average=[round(x, 2) for x in os.getloadavg()],
        repeats=args.repeats,
    )
    rows = [measure(preset.strip(), args.steps, args.repeats) for preset in args.presets.split(",") if preset.strip()]
    meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = markdown(meta, rows)
    print(text)
    if args.out:
        stem = f"host-overhead-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}"
        data = dict(meta=meta, results=[asdict(row) for row in rows])
        paths = write_result_files(args.out, stem, data, text)
        print(f"wrote {paths['json']} and {paths['markdown']}", file=sys.stderr)
    return 0
