"""What the ControlNet costs on fastcache's cached steps, and what `controlnet_reuse=True` saves.

    python -m bench.controlnet_reuse                      # cpu-small + ControlNet, 256 px, 20 steps
    python -m bench.controlnet_reuse --compile-backend none --runs 5

Builds the `cpu-small` preset (SD 1.5 block structure, reduced widths, PNDM, random weights) as a
StableDiffusionControlNetPipeline with a ControlNet made by ``ControlNetModel.from_unet(unet)``
whose zero-initialised output convolutions are randomised (as `fastcache.tiny.tiny_controlnet`
does; otherwise every residual is zero and quality is trivially perfect). Then, in one process:

1. `eager`: the plain pipeline; `fastcache I{k}B{b}`: caching, ControlNet on every step (the
   default, = DeepCache's images); `fastcache I{k}B{b} +reuse`: ``controlnet_reuse=True``.
   End to end (prompt in, decoded images out), median of `--runs` after one untimed call; one
   pipeline per method (same seed, same weights) and the methods' timed calls alternate.
2. Step breakdown: `--runs` more calls per method (alternating) with timing hooks on
   ``pipe.controlnet`` and ``pipe.unet`` (module hooks, not patches): per refresh / cached step,
   the ControlNet's and the U-Net's time and the step's wall time (ControlNet start to the
   end-of-step callback); their sum is the denoising loop's time.
3. Quality against eager at the same seed (final latents: relative L2; decoded images: PSNR, SSIM,
   bench/metrics.py), and reuse against no reuse. For scale, the same figures for eager with the
   ControlNet's conditioning scale at 0 (how far the control signal moves these outputs).

Writes ``controlnet-reuse-<device>.md`` / ``.json`` and sample images under ``--out``
(default bench/results/). Random weights: quality figures measure how far reuse moves *these*
models' outputs; they are a weak proxy for a trained ControlNet's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from . import metrics
from .env import environment, load_average
from .timing import TimingStats, synchronize, timed

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROMPT = "a photo of an astronaut riding a horse on the moon"


def control_image(size: int) -> torch.Tensor:
    """A deterministic edge-map-like control image: rings and a grid, white lines on black."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    rings = ((torch.sqrt(x**2 + y**2) * 6) % 1 < 0.12).float()
    grid = (((x + 1) * 4) % 1 < 0.05).float() + (((y + 1) * 4) % 1 < 0.05).float()
    return (rings + grid).clamp(0, 1).expand(1, 3, size, size).contiguous()


def build(device: torch.device, dtype: torch.dtype, seed: int, zero_conv_std: float) -> Any:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from .presets import get_preset

    base = get_preset("cpu-small").build(device, dtype, seed)
    torch.manual_seed(seed + 1)
    controlnet = ControlNetModel.from_unet(base.unet)
    with torch.no_grad():
        for conv in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, zero_conv_std)
            conv.bias.normal_(0.0, zero_conv_std)
    controlnet = controlnet.to(device=device, dtype=dtype)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StepTimer:
    """Per-step times from module hooks on pipe.controlnet / pipe.unet and the step-end callback."""

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.device = device
        self.events: list[tuple[str, float]] = []
        self._handles = []
        for name in ("controlnet", "unet"):
            module = getattr(pipe, name)
            self._handles.append(module.register_forward_pre_hook(self._mark(f"{name}_start")))
            self._handles.append(module.register_forward_hook(self._mark(f"{name}_end")))

    def _mark(self, event: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            synchronize(self.device)
            self.events.append((event, time.perf_counter()))

        return hook

    def step_end(self, pipe: Any, step: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        synchronize(self.device)
        self.events.append(("step_end", time.perf_counter()))
        return {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def steps(self) -> list[dict[str, float]]:
        """One dict per denoising step: controlnet, unet and wall seconds."""
        out, current, start = [], {}, None
        opened: dict[str, float] = {}
        for event, at in self.events:
            name, _, kind = event.rpartition("_")
            if event == "step_end":
                current["wall"] = at - start if start is not None else float("nan")
                out.append(current)
                current, start = {}, None
            elif kind == "start":
                opened[name] = at
                if start is None:
                    start = at
            else:
                current[name] = current.get(name, 0.0) + at - opened.pop(name)
        return out


def summarise_steps(steps: list[dict[str, float]], decisions: list[bool] | None) -> dict[str, Any]:
    """Median ControlNet / U-Net / wall ms per kind of step (refresh, cached; all for eager)."""
    kinds: dict[str, list[dict[str, float]]] = {}
    for index, step in enumerate(steps):
        kind = "all" if decisions is None else ("refresh" if decisions[index] else "cached")
        kinds.setdefault(kind, []).append(step)
    summary = {}
    for kind, rows in kinds.items():
        med = {key: float(np.median([r.get(key, 0.0) for r in rows])) * 1e3 for key in ("controlnet", "unet", "wall")}
        med["steps"] = len(rows)
        med["controlnet_share_of_wall"] = med["controlnet"] / med["wall"] if med["wall"] else float("nan")
        summary[kind] = med
    return summary


def decode(pipe: Any, latents: torch.Tensor) -> np.ndarray:
    """The pipeline's own decode path: VAE decode of latents / scaling factor, then postprocess."""
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import fastcache

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    dtype = torch.float32
    started = time.perf_counter()
    meta = environment(device)
    meta["command"] = "python -m bench.controlnet_reuse " + shlex.join(sys.argv[1:])
    pipe = build(device, dtype, args.seed, args.zero_conv_std)
    image = control_image(args.res).to(device)
    params = dict(prompt=PROMPT, image=image, height=args.res, width=args.res, num_inference_steps=args.steps,
                  guidance_scale=args.guidance)

    compiled = args.compile_backend != "none"
    options = dict(compile=compiled, compile_backend=args.compile_backend if compiled else "inductor")
    config = f"I{args.interval}B{args.branch}"
    methods: dict[str, dict[str, Any] | None] = {
        "eager": None,
        f"fastcache {config}": dict(controlnet_reuse=False),
        f"fastcache {config} +reuse": dict(controlnet_reuse=True),
    }
    # One pipeline per method, built from the same seed (identical weights, checked), so that timed
    # calls can alternate between methods: other processes' load then falls on all of them alike.
    pipes = {name: (pipe if index == 0 else build(device, dtype, args.seed, args.zero_conv_std))
             for index, name in enumerate(methods)}
    for other in list(pipes.values())[1:]:
        for module in ("unet", "controlnet", "vae", "text_encoder"):
            mine, theirs = getattr(pipe, module).state_dict(), getattr(other, module).state_dict()
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"{module} weights differ between builds"

    def call_on(target: Any, output_type: str = "np", **extra: Any) -> Any:
        generator = torch.Generator("cpu").manual_seed(args.seed)
        return target(**params, generator=generator, output_type=output_type, **extra).images

    handles: dict[str, Any] = {}
    setup: dict[str, float] = {}
    results: dict[str, Any] = {}
    latents: dict[str, torch.Tensor] = {}
    images: dict[str, np.ndarray] = {}
    try:
        for name, extra in methods.items():
            print(f"[controlnet-reuse] setting up {name}", flush=True)
            setup_start = time.perf_counter()
            if extra is not None:
                handles[name] = fastcache.accelerate(pipes[name], args.interval, args.branch, **options, **extra)
                handles[name].warmup(height=args.res, width=args.res, batch_size=1, image=image,
                                     guidance_scale=args.guidance)
            call_on(pipes[name])  # first (untimed) call
            setup[name] = time.perf_counter() - setup_start
        samples: dict[str, list[float]] = {name: [] for name in methods}
        for round_index in range(args.runs):
            print(f"[controlnet-reuse] timed round {round_index + 1}/{args.runs}", flush=True)
            for name in methods:
                samples[name].append(timed(lambda: call_on(pipes[name]), device)[0])
        hooked: dict[str, list[list[dict[str, float]]]] = {name: [] for name in methods}
        decisions: dict[str, list[bool] | None] = {}
        for round_index in range(args.runs):
            print(f"[controlnet-reuse] hooked round {round_index + 1}/{args.runs}", flush=True)
            for name in methods:
                timer = StepTimer(pipes[name], device)
                try:
                    call_on(pipes[name], "latent", callback_on_step_end=timer.step_end)
                finally:
                    timer.remove()
                hooked[name].append(timer.steps())
                handle = handles.get(name)
                decisions[name] = list(handle.stats.last_call) if handle is not None else None
        for name in methods:
            handle = handles.get(name)
            latents[name] = call_on(pipes[name], "latent").float().cpu()
            images[name] = decode(pipes[name], latents[name].to(device))
            reuse = getattr(handle, "_controlnet_reuse", None)
            loops = [sum(step["wall"] for step in steps) for steps in hooked[name]]
            results[name] = dict(
                end_to_end=TimingStats.of(samples[name]).to_dict(),
                denoising_loop=TimingStats.of(loops).to_dict(),
                setup_and_first_call_s=setup[name],
                steps=summarise_steps([step for steps in hooked[name] for step in steps],
                                      None if decisions[name] is None else decisions[name] * args.runs),
                refresh_pattern="".join("R" if d else "c" for d in decisions[name]) if decisions[name] else None,
                controlnet_runs_and_replays_in_process=None if reuse is None else [reuse.runs, reuse.replays],
            )
    finally:
        for handle in handles.values():
            handle.disable()

    def call(output_type: str = "np", **extra: Any) -> Any:
        return call_on(pipe, output_type, **extra)

    # How much the control signal moves these outputs at all: scale 0 (the ControlNet's residuals off).
    latents["eager, conditioning scale 0"] = call("latent", controlnet_conditioning_scale=0.0).float().cpu()
    images["eager, conditioning scale 0"] = decode(pipe, latents["eager, conditioning scale 0"].to(device))

    def quality(a: str, b: str) -> dict[str, float]:
        return dict(
            latent_rel_l2=metrics.relative_l2(latents[a].numpy(), latents[b].numpy()),
            image_psnr_db=metrics.batch_mean(metrics.psnr, images[a], images[b]),
            image_ssim=metrics.batch_mean(metrics.ssim, images[a], images[b]),
        )

    reuse, no_reuse = f"fastcache {config} +reuse", f"fastcache {config}"
    comparisons = {
        f"{no_reuse} vs eager": quality(no_reuse, "eager"),
        f"{reuse} vs eager": quality(reuse, "eager"),
        f"{reuse} vs {no_reuse}": quality(reuse, no_reuse),
        "eager, conditioning scale 0 vs eager": quality("eager, conditioning scale 0", "eager"),
    }
    meta.update(
        pipeline="StableDiffusionControlNetPipeline: cpu-small preset (SD 1.5 blocks, channels 64/128/256/256, "
        "PNDM) + ControlNetModel.from_unet(unet), zero convs ~ N(0, %g^2); random weights" % args.zero_conv_std,
        resolution=args.res, steps=args.steps, guidance_scale=args.guidance, interval=args.interval,
        branch=args.branch, runs=args.runs, seed=args.seed, prompt=PROMPT, dtype=str(dtype).replace("torch.", ""),
        fastcache_compile=("torch.compile backend " + args.compile_backend) if compiled else "compile=False (eager split)",
        load_average_at_end=load_average(), seconds_total=time.perf_counter() - started,
    )
    return dict(meta=meta, methods=results, quality=comparisons, _images=images)


def _fmt(value: float, digits: int = 3) -> str:
    return "inf" if value == float("inf") else f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    meta, methods, quality = report["meta"], report["methods"], report["quality"]
    versions = meta["versions"]
    eager = methods["eager"]["end_to_end"]["median"]
    lines = [
        "# fastcache benchmark: ControlNet on cached steps, `controlnet_reuse`",
        "",
        f"{meta['pipeline']}. {meta['resolution']}x{meta['resolution']}, batch 1, {meta['steps']} steps, guidance "
        f"{meta['guidance_scale']} (the U-Net and the ControlNet both run at batch 2), {meta['dtype']} on "
        f"{meta['device_name']}, {meta['torch_threads']} torch threads. fastcache: {meta['fastcache_compile']}, "
        f"cache_interval {meta['interval']}, cache_branch_id {meta['branch']}. Seed {meta['seed']}, prompt "
        f"\"{meta['prompt']}\".",
        "",
        f"torch {versions['torch']}, diffusers {versions['diffusers']}, fastcache {versions['fastcache']} "
        f"(commit {meta['git_commit']}{', with uncommitted changes' if meta['fastcache_dirty'] else ''}), "
        f"python {meta['python']}, {meta['cpu_count']} CPUs. Load average (1/5/15 min) at the start "
        f"{meta['load_average_at_start']}, at the end {meta['load_average_at_end']} (other processes share "
        f"this machine); whole run {meta['seconds_total']:.0f} s.",
        "",
        f"Command: `{meta['command'].strip()}`",
        "",
        "## End to end (prompt in, decoded image out)",
        "",
        f"Median of {meta['runs']} timed calls per method after one untimed call, one pipeline per method (same "
        "weights), the methods alternating call by call so that other processes' load falls on all alike; "
        "`setup` is accelerate + warmup + that first call.",
        "",
        "`denoising loop`: median over the hooked calls below of the sum of their step walls (no text "
        "encoding, no VAE decode).",
        "",
        "| method | s/image, median [min, max] | speed-up over eager | denoising loop s (speed-up) | setup s |",
        "|---|---|---|---|---|",
    ]
    loop = methods["eager"]["denoising_loop"]["median"]
    for name, result in methods.items():
        e2e = result["end_to_end"]
        lines.append(
            f"| {name} | {e2e['median']:.3f} [{e2e['min']:.3f}, {e2e['max']:.3f}] | {eager / e2e['median']:.2f}x | "
            f"{result['denoising_loop']['median']:.3f} ({loop / result['denoising_loop']['median']:.2f}x) | "
            f"{result['setup_and_first_call_s']:.1f} |"
        )
    lines += [
        "",
        f"## Per denoising step ({meta['runs']} latent-output calls per method with timing hooks on pipe.controlnet "
        "and pipe.unet, alternating between methods)",
        "",
        "Median milliseconds over every step of each kind; `wall` runs from the step's ControlNet call to its end-of-step "
        "callback (ControlNet, U-Net, guidance, scheduler); `share` is the ControlNet's part of `wall`. With reuse "
        "the ControlNet column of a cached step is the replay (returning stored tensors).",
        "",
        "| method | step kind | steps | ControlNet ms | U-Net ms | wall ms | ControlNet share |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in methods.items():
        for kind, row in result["steps"].items():
            lines.append(
                f"| {name} | {kind} | {row['steps']} | {row['controlnet']:.1f} | {row['unet']:.1f} | {row['wall']:.1f} | "
                f"{100 * row['controlnet_share_of_wall']:.0f}% |"
            )
    pattern = methods[next(n for n in methods if n.endswith("+reuse"))]["refresh_pattern"]
    lines += [
        "",
        f"U-Net calls of one fastcache call (R refresh, c cached): `{pattern}` (PNDM evaluates its second timestep twice).",
        "",
        "## Quality",
        "",
        "Final latents (relative L2) and decoded images (PSNR, SSIM; bench/metrics.py), same seed and prompt. "
        "Random weights: these figures say how far each method moves *this* model's output, a weak proxy for a "
        "trained model's quality. The last row is the control signal's own effect, for scale.",
        "",
        "| comparison | latent rel. L2 | image PSNR dB | image SSIM |",
        "|---|---|---|---|",
    ]
    for name, row in quality.items():
        lines.append(f"| {name} | {_fmt(row['latent_rel_l2'], 4)} | {_fmt(row['image_psnr_db'], 2)} | {_fmt(row['image_ssim'], 4)} |")
    lines += ["", f"Sample images: `{report.get('samples_dir', '')}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.controlnet_reuse", description=__doc__.split("\n")[0])
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero-conv-std", type=float, default=0.05,
                        help="std of the randomised ControlNet output convolutions (trained ones are not zero)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="fastcache's torch.compile backend, or 'none' for compile=False")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--name", default=None, help="file stem (default controlnet-reuse-<device type>)")
    args = parser.parse_args(argv)
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"controlnet-reuse-{torch.device(args.device).type}")
    images = report.pop("_images")
    samples = stem + "-samples"
    os.makedirs(samples, exist_ok=True)
    from PIL import Image

    for name, batch in images.items():
        file = name.replace(" ", "_").replace(",", "").replace("+", "")
        Image.fromarray((batch[0] * 255).round().astype(np.uint8)).save(os.path.join(samples, f"{file}.png"))
    report["samples_dir"] = os.path.relpath(samples, os.path.dirname(stem))
    from .results import to_jsonable

    with open(stem + ".json", "w") as handle:
        json.dump(to_jsonable(report), handle, indent=2, allow_nan=False)
    text = markdown(report)
    with open(stem + ".md", "w") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
