"""``python -m fastcache demo``: plain vs fastcache (and DeepCache, if installed) on a tiny pipeline.

Builds a Stable Diffusion pipeline with tiny random weights offline, so it runs on any machine,
GPU or not. Reports seconds per image (the methods timed in alternating rounds, so that a shared
machine's bursts of load fall on every method alike; warm-up excluded and shown apart), how far
each image is from the plain pipeline's, and writes the images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

import fastcache
from fastcache.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline


@dataclass
class DemoResult:
    method: str
    seconds: float  # median of `samples`
    image: np.ndarray  # (H, W, 3) floats in [0, 1]
    setup_seconds: float = 0.0
    samples: tuple[float, ...] = ()  # every timed run (one per round), so the report can show the spread
    speedup: float = 1.0  # median over rounds of plain's seconds / this method's, in the same round


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """One run's seconds (the device synchronised around it) and its result."""
    _sync(device)
    start = time.perf_counter()
    result = function()
    _sync(device)
    return time.perf_counter() - start, result


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """10 log10(range^2 / MSE) in dB, in float64; inf for identical inputs. The one PSNR of the
    project: the benchmarks (bench/metrics.py) use it too."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * float(np.log10(data_range**2 / mse))


@dataclass
class _Method:
    name: str
    generate: Callable[[], np.ndarray]
    setup_seconds: float
    close: Callable[[], None]


def run_demo(args: argparse.Namespace) -> list[DemoResult]:
    """Each method on its own copy of the pipeline (the same weights: the tiny builders are
    seeded), prepared first, then timed in alternating rounds, one call of each method per round:
    a burst of load from another process slows one round of every method, not one method."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    build = tiny_sdxl_pipeline if args.pipeline == "sdxl" else tiny_sd_pipeline

    def generator_of(pipe: Any) -> Callable[[], np.ndarray]:
        def generate() -> np.ndarray:
            generator = torch.Generator("cpu").manual_seed(args.seed)
            return pipe(args.prompt, num_inference_steps=args.steps, generator=generator, output_type="np").images[0]
        return generate

    methods: list[_Method] = []
    try:
        plain = generator_of(build(device=device, dtype=dtype))
        methods.append(_Method("plain diffusers", plain, _timed(plain, device)[0], lambda: None))  # lazy init
        deepcache = _deepcache_method(build(device=device, dtype=dtype), args, generator_of, device)
        if deepcache is not None:
            methods.append(deepcache)
        methods.append(_fastcache_method(build(device=device, dtype=dtype), args, generator_of, None))
        if args.gate_step is not None:
            methods.append(_fastcache_method(build(device=device, dtype=dtype), args, generator_of, args.gate_step))
        samples: dict[str, list[float]] = {m.name: [] for m in methods}
        images: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for method in methods:
                seconds, images[method.name] = _timed(method.generate, device)
                samples[method.name].append(seconds)
    finally:
        for method in methods:
            method.close()
    base = samples[methods[0].name]
    return [
        DemoResult(m.name, statistics.median(samples[m.name]), images[m.name], m.setup_seconds, tuple(samples[m.name]),
                   statistics.median(p / t for p, t in zip(base, samples[m.name])))
        for m in methods
    ]


def _deepcache_method(pipe: Any, args: argparse.Namespace, generator_of: Callable[[Any], Callable[[], np.ndarray]],
                      device: torch.device) -> _Method | None:
    """DeepCache's helper on `pipe` (setup: its first call), or None where the package is missing."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        return None
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=args.interval, cache_branch_id=args.branch)
    helper.enable()
    generate = generator_of(pipe)
    return _Method("DeepCache 0.1.1", generate, _timed(generate, device)[0], helper.disable)


def _fastcache_method(pipe: Any, args: argparse.Namespace, generator_of: Callable[[Any], Callable[[], np.ndarray]],
                      gate_step: int | None) -> _Method:
    """fastcache (with TGATE from `gate_step`), accelerated and warmed; setup: accelerate + warm-up."""
    setup = time.perf_counter()
    cache = args.compile_cache if gate_step is None else None
    loaded = False
    if cache is not None and os.path.exists(cache):
        load = fastcache.load_compile_cache(cache)
        loaded = bool(load)
        if not loaded:  # say why before the run compiles and saves a new file over it
            print(f"compile cache: {cache} not loaded: {load.reason}")
    handle = fastcache.accelerate(pipe, cache_interval=args.interval, cache_branch_id=args.branch,
                                  compile=args.compile, gate_step=gate_step)
    try:
        handle.warmup(height=None, width=None, batch_size=1,
                      **({} if gate_step is None else {"num_inference_steps": args.steps}))
    except BaseException:
        handle.disable()
        raise
    setup_seconds = time.perf_counter() - setup
    if cache is not None:
        _report_compile_cache(cache, loaded, setup_seconds, args.compile)
    name = "fastcache" if gate_step is None else f"fastcache+TGATE {gate_step}"
    return _Method(name, generator_of(pipe), setup_seconds, handle.disable)


def _report_compile_cache(path: str, loaded: bool, setup_seconds: float, compiled: bool) -> None:
    """--compile-cache: say what was loaded; save the file on a run that had to compile."""
    if loaded:
        print(f"compile cache: loaded {path}; accelerate + warmup took {setup_seconds:.1f} s")
    elif compiled:
        saved = fastcache.save_compile_cache(path)
        print(f"compile cache: no file yet, accelerate + warmup took {setup_seconds:.1f} s; saved {path} "
              f"({saved.size_bytes / 1e6:.1f} MB), the next run with --compile-cache loads it")


def _trust_line() -> str:
    """How much the timings can be trusted: other processes on the CPU show in the load average."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return "timings: wall clock; rerun to see how they vary on this machine"
    verdict = ("other processes competed for the CPU: treat the speed-ups as rough"
               if load > 0.5 * cores else "the machine was otherwise quiet")
    return f"load average {load:.2f} on {cores} cores at the end: {verdict}"


def report(results: list[DemoResult], args: argparse.Namespace) -> str:
    plain = results[0]
    lines = [
        f"tiny {args.pipeline} pipeline, {args.steps} steps, cache_interval={args.interval}, "
        f"cache_branch_id={args.branch}, compile={args.compile}; {args.repeats} rounds, each method once per "
        "round in turn: median s/image (min-max), speed-up = median of the rounds' ratios to plain",
        f"{'method':<20}{'s/image':>10}{'min-max':>17}{'speed-up':>10}{'max |diff| vs plain':>22}"
        f"{'PSNR vs plain':>15}{'setup s':>10}",
    ]
    for result in results:
        diff = float(np.abs(result.image - plain.image).max())
        spread = f"{min(result.samples):.4f}-{max(result.samples):.4f}" if result.samples else "-"
        lines.append(
            f"{result.method:<20}{result.seconds:>10.4f}{spread:>17}{result.speedup:>9.2f}x"
            f"{diff:>22.3g}{psnr(result.image, plain.image):>15.1f}{result.setup_seconds:>10.1f}"
        )
    by_name = {r.method: r for r in results}
    if "DeepCache 0.1.1" in by_name:
        deep, fast = by_name["DeepCache 0.1.1"], by_name["fastcache"]
        ratio = statistics.median(d / f for d, f in zip(deep.samples, fast.samples))
        lines.append(
            f"fastcache vs DeepCache: max |diff| {float(np.abs(fast.image - deep.image).max()):.3g} "
            f"(images in [0, 1]), {ratio:.2f}x faster (median of the rounds' ratios)"
        )
    else:
        lines.append("no DeepCache row: the DeepCache package is not installed (pip install DeepCache==0.1.1, "
                     "or install fastcache with the [test] extra)")
    if args.gate_step is None:
        lines.append("TGATE on top: --gate-step 10 adds fastcache with gate_step=10 (no guidance and cached "
                     "cross-attention after step 10; docs/options.md, \"TGATE\", has its measured gain and cost)")
    lines.append(_trust_line())
    return "\n".join(lines)


def save_images(results: list[DemoResult], out: str) -> list[str]:
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    paths = []
    for result in results:
        name = result.method.split()[0].lower().replace("+", "-") + ".png"
        path = os.path.join(out, name)
        Image.fromarray((np.clip(result.image, 0, 1) * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", choices=("sd", "sdxl"), default="sd", help="tiny SD 1.x or SDXL pipeline")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--interval", type=int, default=3, help="cache_interval")
    parser.add_argument("--branch", type=int, default=0, help="cache_branch_id")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds; each times every method once, in turn (medians reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gate-step", type=int, default=None,
                        help="also run fastcache with TGATE from this step on (gate_step)")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="run the split eagerly")
    parser.add_argument("--out", default="fastcache-demo", help="folder for the images")
    parser.add_argument("--compile-cache", default=None, metavar="PATH",
                        help="load torch's compile caches from PATH before warm-up if it exists, else save them "
                             "there after (fastcache.load_compile_cache / save_compile_cache)")


def main(args: argparse.Namespace) -> int:
    results = run_demo(args)
    print(report(results, args))
    for path in save_images(results, args.out):
        print(f"wrote {path}")
    return 0
