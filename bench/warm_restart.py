"""Warm-up cost: seconds from ``accelerate`` to the first fast image, cold and after a restart.

    python -m bench warm-restart --preset cpu-small --res 256 --config I3B0 --runs 2

Each run is three fresh processes (``python -m bench restart-probe``), each building the pipeline,
then ``accelerate`` + ``warmup`` and one end-to-end image:

1. ``cold``: a new, empty ``TORCHINDUCTOR_CACHE_DIR``; the probe then saves
   ``fastcache.save_compile_cache`` to a file (after the timed part);
2. ``restart-dir``: the same cache directory, now filled (a server restarted on the same machine);
3. ``restart-file``: another new, empty cache directory, with ``fastcache.load_compile_cache``
   of the file before ``accelerate`` (a server started on a fresh machine or container).

"To first image" is load (3 only) + accelerate + warmup + the first image; the process column adds
interpreter start, imports and building the pipeline. Medians over runs; ratios are cold / restart.
Results go to ``<out>/warm-restart-<preset>-<timestamp>.{json,md}`` (``INDEX.md`` links the newest).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import tempfile
import time
from typing import Any

from .results import write_result_files

MODES = ("cold", "restart-dir", "restart-file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .args import DEFAULT_PROMPT, RESULTS, sizes

    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--res", type=sizes, default=None, help="one resolution, e.g. 256 (default: the preset's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--config", default="I3B0", help="DeepCache config I<interval>B<branch>")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--runs", type=int, default=2, help="cold/restart triples (medians reported)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto")
    parser.add_argument("--out", default=RESULTS, help="folder for the result files")


def _row(mode: str, process_s: float, import_s: float, report: dict[str, Any]) -> dict[str, Any]:
    phases = report.get("phases_s", {})
    load_s = report.get("load_s", 0.0) if mode == "restart-file" else 0.0
    return {
        "mode": mode,
        "process_s": process_s,
        "process_cpu_s": report.get("process_cpu_s"),
        "import_s": import_s,
        "build_s": report["build_s"],
        "load_s": load_s,
        "accelerate_warmup_s": report["accelerate_warmup_s"],
        "first_image_s": report["first_image_after_warmup_s"],
        "to_first_image_s": load_s + report["accelerate_warmup_s"] + report["first_image_after_warmup_s"],
        # dynamo: tracing the U-Net functions to FX graphs (entire frame compile less the backend);
        # backend: AOTAutograd + inductor, cache lookups and kernel builds/loads included.
        "dynamo_s": phases.get("entire_frame_compile", 0.0) - phases.get("backend_compile", 0.0),
        "backend_s": phases.get("backend_compile", 0.0),
        "fxgraph_cache": report["compile_cache"],
        "aot_autograd_cache": report.get("aot_autograd_cache", {}),
        "load": report.get("load"),
        "save": report.get("save"),
        "phases_s": phases,
    }


def _median(rows: list[dict[str, Any]], mode: str, name: str) -> float:
    return statistics.median(row[name] for row in rows if row["mode"] == mode)


def markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    env = meta["environment"]
    lines = [
        f"# Warm-up and restart: {meta['preset']} {meta['shape']} {meta['config']}", "",
        f"`{meta['command']}`", "",
        f"{env['device_name']}, {env['cpu_count']} CPUs, torch {env['versions']['torch']}, diffusers "
        f"{env['versions']['diffusers']}, fastcache {env['versions']['fastcache']} (git {str(env['git_commit'])[:10]}"
        f"{', uncommitted changes' if env['fastcache_dirty'] else ''}); {meta['steps']} steps, "
        f"{meta['dtype']}, load average {env['load_average_at_start']} at start, {meta['load_average_at_end']} at end. "
        f"Median of {meta['runs']} runs (seconds).", "",
        "| mode | to first image | vs cold | process | vs cold | process CPU s | vs cold | accelerate + warmup "
        "| load file | first image | dynamo trace | AOT + inductor | FX cache hit/miss | AOTAutograd hit/miss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cold_first, cold_process = _median(rows, "cold", "to_first_image_s"), _median(rows, "cold", "process_s")
    cold_cpu = _median(rows, "cold", "process_cpu_s")
    for mode in MODES:
        mine = [row for row in rows if row["mode"] == mode]
        first, process = _median(rows, mode, "to_first_image_s"), _median(rows, mode, "process_s")
        cpu = _median(rows, mode, "process_cpu_s")
        fx = mine[-1]["fxgraph_cache"]
        aot = mine[-1]["aot_autograd_cache"]
        lines.append(
            f"| {mode} | {first:.2f} | {cold_first / first:.1f}x | {process:.2f} | {cold_process / process:.1f}x "
            f"| {cpu:.1f} | {cold_cpu / cpu:.1f}x "
            f"| {_median(rows, mode, 'accelerate_warmup_s'):.2f} | {_median(rows, mode, 'load_s'):.2f} "
            f"| {_median(rows, mode, 'first_image_s'):.2f} | {_median(rows, mode, 'dynamo_s'):.2f} "
            f"| {_median(rows, mode, 'backend_s'):.2f} "
            f"| {fx.get('fxgraph_cache_hit', 0)}/{fx.get('fxgraph_cache_miss', 0)} "
            f"| {aot.get('autograd_cache_hit', 0)}/{aot.get('autograd_cache_miss', 0)} |"
        )
    saved = next(row["save"] for row in rows if row["mode"] == "cold")
    lines += [
        "", f"Cache file: {saved['size_bytes'] / 1e6:.1f} MB, entries {saved['artifacts']}, saved in "
        f"{saved['seconds']:.2f} s. Process = interpreter start to exit (imports "
        f"{_median(rows, 'cold', 'import_s'):.1f} s, "
        f"building the pipeline {_median(rows, 'cold', 'build_s'):.1f} s, the image, exit).", "",
        "Every run:", "",
        "| run | mode | to first image | process | process CPU s | dynamo trace | AOT + inductor |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {row['run']} | {row['mode']} | {row['to_first_image_s']:.2f} | {row['process_s']:.2f} "
              f"| {row['process_cpu_s']:.1f} "
              f"| {row['dynamo_s']:.2f} | {row['backend_s']:.2f} |" for row in rows]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from .env import environment, load_average
    from .presets import get_preset
    from .restart import run_probe_report

    preset = get_preset(args.preset)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    width, height = (args.res or [(preset.resolution,) * 2])[0]
    steps = args.steps or preset.steps
    probe = {
        "preset": preset.name, "width": width, "height": height, "batch": args.batch, "config": args.config,
        "steps": steps, "prompt": args.prompt, "seed": 0, "guidance": args.guidance, "device": str(device),
        "dtype": args.dtype, "compile-backend": "inductor",
    }
    started = time.time()
    env = environment(device)
    root = tempfile.mkdtemp(prefix="bench-warm-restart-")
    rows = []
    try:
        for run in range(args.runs):
            directory, empty = os.path.join(root, f"dir-{run}"), os.path.join(root, f"empty-{run}")
            path = os.path.join(root, f"compile-cache-{run}.bin")
            plan = [
                ("cold", directory, {"save-compile-cache": path}),
                ("restart-dir", directory, {}),
                ("restart-file", empty, {"load-compile-cache": path}),
            ]
            for mode, cache_dir, extra in plan:
                os.makedirs(cache_dir, exist_ok=True)
                print(f"run {run + 1}/{args.runs}: {mode} (TORCHINDUCTOR_CACHE_DIR={cache_dir})", flush=True)
                process_s, import_s, report = run_probe_report(
                    {**probe, **extra}, env={"TORCHINDUCTOR_CACHE_DIR": cache_dir})
                row = {"run": run + 1, **_row(mode, process_s, import_s, report)}
                print(f"  to first image {row['to_first_image_s']:.2f} s, process {process_s:.2f} s", flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    meta = {
        "command": "python -m bench " + shlex.join(argv), "preset": preset.name,
        "shape": f"{width}x{height} b{args.batch}", "config": args.config, "steps": steps,
        "dtype": args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32"),
        "runs": args.runs, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "total_s": time.time() - started, "environment": env, "load_average_at_end": load_average(),
    }
    columns = ("to_first_image_s", "process_s", "process_cpu_s", "dynamo_s", "backend_s")
    medians = {mode: {name: _median(rows, mode, name) for name in columns} for mode in MODES}
    result = {"meta": meta, "medians": medians, "rows": rows}
    stem = f"warm-restart-{preset.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}"
    text = markdown(result)
    write_result_files(args.out, stem, result, text)
    print(text)
    print(f"wrote {os.path.join(args.out, stem)}.json/.md")
    return 0
