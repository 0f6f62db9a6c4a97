"""The benchmark command.

    python -m bench run --preset sd21 --res 512,768 --batch 1,4,8 --steps 50 --configs I3B0,I5B0,I5B1

times eager diffusers, DeepCache, torch.compile and fastcache in one process on the same inputs,
prints the tables and writes JSON, Markdown, a plot and sample images (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from .args import DEFAULT_PROMPT, RESULTS, cuda_graphs, ints, option, sizes, torch_dtype, tweaks


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from .presets import PRESETS

    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--res", type=sizes, default=None,
                        help="resolutions, e.g. 512,768 or 768x512 (default: the preset's)")
    parser.add_argument("--batch", type=ints, default=[1], help="images per prompt, e.g. 1,4,8")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--configs", default="I3B0,I5B0,I5B1",
                        help="DeepCache configs I<interval>B<branch>, comma-separated; I<interval>B<branch>G<gate> "
                             "adds TGATE from step <gate> (compared with the tgate package instead of DeepCache)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per method and mode (median and spread)")
    parser.add_argument("--step-calls", type=int, default=None,
                        help="direct U-Net calls per refresh interval for step timing (default: --runs)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance_scale (> 1: classifier-free guidance)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                        help="auto: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of `compile` and `fastcache` (the smoke test uses eager)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the `compile` method")
    parser.add_argument("--fastcache-option", type=option, action="append", default=[], metavar="NAME=VALUE",
                        help="another fastcache.accelerate keyword for the fastcache method, VALUE as JSON "
                             "where it parses (true, 3, {\"conv_1x1_as_mm\": true}), else a string; repeatable")
    parser.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto", help="fastcache's cuda_graphs")
    parser.add_argument("--unet-tweaks", type=tweaks, default=(), metavar="NAMES",
                        help="comma-separated U-Net changes for every method alike: fuse_qkv, channels_last "
                             "(bench/tweaks.py)")
    parser.add_argument("--restart", choices=("first", "all", "none"), default="first",
                        help="time accelerate+warmup in a fresh process with a filled compile cache: for the first "
                             "shape, every shape, or not at all")
    parser.add_argument("--cache-dir", default=None,
                        help="TORCHINDUCTOR_CACHE_DIR for this run; default: a new empty directory, removed at the "
                             "end, so in-process compiles are cold and the restart probes see only this run's")
    parser.add_argument("--out", default=RESULTS, help="folder for the result files")


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--device", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--cuda-graphs", type=cuda_graphs, default=None)
    parser.add_argument("--unet-tweaks", type=tweaks, default=())
    parser.add_argument("--fastcache-options-json", default=None, help="more fastcache.accelerate keywords, as JSON")
    parser.add_argument("--load-compile-cache", default=None, help="fastcache.load_compile_cache(PATH) before accelerate")
    parser.add_argument("--save-compile-cache", default=None, help="fastcache.save_compile_cache(PATH) after the image")


def _compile_cache(args: argparse.Namespace) -> tuple[str, bool, str]:
    """Point inductor at this run's cache directory; (path, created by us, description)."""
    if args.cache_dir:
        path = os.path.abspath(args.cache_dir)
        empty = not os.path.isdir(path) or not os.listdir(path)
        os.makedirs(path, exist_ok=True)
        created, description = False, f"`{path}` ({'empty' if empty else 'not empty'} at the start)"
    else:
        path = tempfile.mkdtemp(prefix="bench-inductor-cache-")
        created, description = True, "a new empty directory (in-process compiles are cold)"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path, created, description


def _meta(args: argparse.Namespace, argv: list[str], preset: Any, pipe: Any, build_s: float, device: Any,
          dtype: Any, settings: Any, shapes: list[Any], started: float, cache_created: bool,
          cache_description: str) -> dict[str, Any]:
    """Everything about the run except its measurements: command, environment, settings, pipeline."""
    from .env import environment

    return {
        "command": "python -m bench " + shlex.join(argv),
        "argv": argv,
        "preset_description": preset.description,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "environment": environment(device),
        "settings": {
            "preset": preset.name, "steps": settings.steps, "runs": settings.runs,
            "step_calls_per_interval": settings.step_calls, "prompt": settings.prompt, "seed": settings.seed,
            "guidance_scale": settings.guidance_scale, "dtype": str(dtype).replace("torch.", ""),
            "configs": [c.label for c in _configs(args)], "shapes": [s.label for s in shapes],
            "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
            "cuda_graphs": args.cuda_graphs, "restart": args.restart,
            "fastcache_options": dict(args.fastcache_option), "unet_tweaks": list(args.unet_tweaks),
        },
        "pipeline": {
            "class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "build_s": build_s,
            "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
            "weight_bytes": _weight_bytes(pipe),
        },
        "compile_cache": {"created_for_this_run": cache_created, "description": cache_description},
    }


def _weight_bytes(pipe: Any) -> int:
    """Bytes of every component's parameters and buffers: the part of each method's peak memory
    that is the same for all of them."""
    import torch

    from fastcache.runtime import tensor_bytes

    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    return tensor_bytes(t for m in modules for t in [*m.parameters(), *m.buffers()])


def _configs(args: argparse.Namespace) -> list[Any]:
    """The ``--configs`` list as CacheConfig objects."""
    from .runner import parse_configs

    return parse_configs(args.configs)


def _restarts(args: argparse.Namespace, preset: Any, shapes: list[Any], steps: int, device: Any) -> list[Any]:
    """The restart probes: every fastcache config at the first shape, every shape, or none."""
    from .restart import run_probe
    from .runner import log

    results = []
    for shape in {"first": shapes[:1], "all": shapes, "none": []}[args.restart]:
        for config in _configs(args):
            log(f"restart probe: {shape.label} fastcache {config.label}")
            results.append(run_probe({
                "preset": preset.name, "width": shape.width, "height": shape.height, "batch": shape.batch,
                "config": config.label, "steps": steps, "prompt": args.prompt, "seed": args.seed,
                "guidance": args.guidance, "device": str(device), "dtype": args.dtype,
                "compile-backend": args.compile_backend, "cuda-graphs": args.cuda_graphs,
                "unet-tweaks": ",".join(args.unet_tweaks) or None,
                "fastcache-options-json": json.dumps(dict(args.fastcache_option)) if args.fastcache_option else None,
            }))
    return results


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``python -m bench run``: measure every shape and method, then the restarts; write the files."""
    import torch

    from . import report
    from .env import load_average
    from .methods import CompileSettings, Shape, build_methods
    from .presets import get_preset
    from .results import BenchResult
    from .runner import RunSettings, measure_shape
    from .tweaks import apply_tweaks

    started = time.time()
    preset = get_preset(args.preset)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch_dtype(args.dtype, device)
    configs = _configs(args)
    shapes = [Shape(w, h, b) for (w, h) in (args.res or [(preset.resolution,) * 2]) for b in args.batch]
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    settings = RunSettings(args.steps or preset.steps, args.runs, args.prompt, args.seed, args.guidance,
                           args.step_calls or args.runs)
    cache_path, cache_created, cache_description = _compile_cache(args)
    # SIGTERM as SystemExit, so that `finally` still removes the temporary compile cache.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        build_start = time.perf_counter()
        pipe = preset.build(device, dtype, args.seed)
        apply_tweaks(pipe, args.unet_tweaks)
        build_s = time.perf_counter() - build_start
        methods = build_methods(configs, CompileSettings(args.compile_backend, args.compile_mode,
                                                         cuda_graphs(args.cuda_graphs),
                                                         tuple(args.fastcache_option)))
        result = BenchResult(_meta(args, argv, preset, pipe, build_s, device, dtype, settings, shapes, started,
                                   cache_created, cache_description))
        samples: dict[str, Any] = {}
        for index, shape in enumerate(shapes):
            result.shapes.append(measure_shape(pipe, shape, methods, settings, device, samples if index == 0 else None))
        del pipe, methods
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result.restarts = _restarts(args, preset, shapes, settings.steps, device)
        result.meta["total_s"] = time.time() - started
        result.meta["environment"]["load_average_at_end"] = load_average()
        stem = f"{preset.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}"
        paths = report.write_all(result, args.out, stem, samples)
    finally:
        if cache_created:
            shutil.rmtree(cache_path, ignore_errors=True)
    print(report.summary(result))
    print()
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``python -m bench``'s parser: run, restart-probe, warm-restart, host-overhead, paired, serve-load."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(commands.add_parser("run", help="run the benchmark and write result files"))
    add_probe_arguments(commands.add_parser("restart-probe", help="internal: the fresh process of the restart timing"))
    from .warm_restart import add_arguments as add_warm_restart_arguments

    add_warm_restart_arguments(commands.add_parser(
        "warm-restart", help="seconds to the first image: cold, restart with the cache dir, restart from a cache file"))
    from .host_overhead import add_arguments as add_host_overhead_arguments

    add_host_overhead_arguments(commands.add_parser(
        "host-overhead", help="host time fastcache adds per U-Net call and pipeline call (no device work)"))
    from .paired import add_arguments as add_paired_arguments

    add_paired_arguments(commands.add_parser(
        "paired", help="methods on copies of one pipeline, called in turn each round: ratios robust to a noisy machine"))
    from .serve_load import add_arguments as add_serve_load_arguments

    add_serve_load_arguments(commands.add_parser(
        "serve-load", help="load-test `python -m fastcache serve`: diffusers, DeepCache, fastcache side by side"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "host-overhead":
        from .host_overhead import main as host_overhead_main

        return host_overhead_main(args, argv)
    if args.command == "restart-probe":
        from .restart import probe_main

        return probe_main(args)
    if args.command == "paired":
        from .paired import main as paired_main

        return paired_main(args, argv)
    if args.command == "serve-load":
        from .serve_load import main as serve_load_main

        return serve_load_main(args, argv)
    if args.command == "warm-restart":
        from .warm_restart import main as warm_restart_main

        return warm_restart_main(args, argv)
    return run(args, argv)
