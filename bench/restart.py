"""Time to first image after a process restart, with inductor's on-disk cache already filled.

The parent runs ``python -m bench restart-probe ...`` in a fresh interpreter (same environment,
so the same ``TORCHINDUCTOR_CACHE_DIR`` that the in-process runs filled). The child builds the
pipeline, then times ``fastcache.accelerate`` + ``warmup`` and the first image after it, and
prints one JSON line. The parent times the whole process from launch to exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from .results import RestartResult

MARKER = "BENCH-RESTART "
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe_command(args: dict[str, Any]) -> list[str]:
    """The child's command line (``args``: option name -> value)."""
    command = [sys.executable, "-m", "bench", "restart-probe"]
    for name, value in args.items():
        if value is not None:
            command += [f"--{name}", str(value)]
    return command


def run_probe_report(args: dict[str, Any], env: dict[str, str] | None = None,
                     timeout_s: float = 3600.0) -> tuple[float, float, dict[str, Any]]:
    """Launch the child (``env`` added to this process's environment), wait; (process wall s,
    seconds from launch to the child's main, the child's report)."""
    launched = time.time()
    start = time.perf_counter()
    cpu_before = _children_cpu_s()
    completed = subprocess.run(
        probe_command(args), cwd=_REPO, capture_output=True, text=True, timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )
    process_s = time.perf_counter() - start
    lines = [line for line in completed.stdout.splitlines() if line.startswith(MARKER)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"restart probe failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    report = json.loads(lines[-1][len(MARKER):])
    # CPU seconds of the child and everything it waited for (compile workers, the C++ compiler):
    # unlike wall time, barely moved by other jobs on a shared machine.
    report["process_cpu_s"] = _children_cpu_s() - cpu_before
    return process_s, report["main_started"] - launched, report


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_probe(args: dict[str, Any], timeout_s: float = 3600.0) -> RestartResult:
    """Launch the child, wait, and combine its report with the process wall time."""
    process_s, import_s, report = run_probe_report(args, timeout_s=timeout_s)
    return RestartResult(
        config=args["config"], shape=f"{args['width']}x{args['height']} b{args['batch']}", process_s=process_s,
        import_s=import_s, build_s=report["build_s"],
        accelerate_warmup_s=report["accelerate_warmup_s"],
        first_image_after_warmup_s=report["first_image_after_warmup_s"],
        compilations=report["compilations"], compile_cache=report["compile_cache"],
    )


def probe_main(options: Any) -> int:
    """The child side (``python -m bench restart-probe``): build, accelerate + warmup, one image."""
    main_started = time.time()
    import torch

    import fastcache

    from .args import torch_dtype
    from .methods import CacheConfig, Shape
    from .presets import get_preset
    from .runner import compile_counters
    from .timing import synchronize, timed
    from .tweaks import apply_tweaks
    from .workload import Workload

    device = torch.device(options.device)
    dtype = torch_dtype(options.dtype, device)
    config = CacheConfig.parse(options.config)
    shape = Shape(options.width, options.height, options.batch)
    build_s, pipe = timed(lambda: get_preset(options.preset).build(device, dtype, options.seed), device)
    apply_tweaks(pipe, options.unet_tweaks)
    workload = Workload(pipe, shape, options.steps, options.prompt, options.seed, options.guidance)
    before = compile_counters()
    start = time.perf_counter()
    loaded = None
    if options.load_compile_cache:
        loaded = fastcache.load_compile_cache(options.load_compile_cache)
    load_s = time.perf_counter() - start
    handle = fastcache.accelerate(
        pipe, cache_interval=config.interval, cache_branch_id=config.branch,
        **({} if config.gate is None else {"gate_step": config.gate}),
        compile_backend=options.compile_backend, cuda_graphs=options.cuda_graphs,
        **json.loads(options.fastcache_options_json or "{}"),  # the parent's --fastcache-option
    )
    handle.warmup(height=shape.height, width=shape.width, batch_size=shape.batch, **workload.call_kwargs())
    synchronize(device)
    warm_s = time.perf_counter() - start
    first_s, _ = timed(workload.end_to_end, device)
    report = {
        "main_started": main_started, "build_s": build_s, "accelerate_warmup_s": warm_s - load_s,
        "first_image_after_warmup_s": first_s, "compilations": handle.compilations,
        "compile_cache": {k: v - before[k] for k, v in compile_counters().items()},
    }
    handle.disable()
    report.update(_compile_cache_details(options, loaded, load_s))
    print(MARKER + json.dumps(report), flush=True)
    return 0


def _compile_cache_details(options: Any, loaded: Any, load_s: float) -> dict[str, Any]:
    """The compile cache file's fate (--load/--save-compile-cache), AOTAutograd's cache, and where
    compile time went (dynamo's phase timers)."""
    import torch
    from torch._dynamo.utils import calculate_time_spent, counters

    import fastcache

    details: dict[str, Any] = {"load_s": load_s, "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    if loaded is not None:
        details["load"] = {"loaded": loaded.loaded, "reason": loaded.reason, "artifacts": loaded.artifacts,
                           "size_bytes": loaded.size_bytes}
    if options.save_compile_cache:
        start = time.perf_counter()
        saved = fastcache.save_compile_cache(options.save_compile_cache)
        details["save"] = {"seconds": time.perf_counter() - start, "artifacts": saved.artifacts,
                           "size_bytes": saved.size_bytes}
    details["aot_autograd_cache"] = {k: int(v) for k, v in counters["aot_autograd"].items() if "cache" in k}
    details["phases_s"] = calculate_time_spent()
    details["torch_threads"] = torch.get_num_threads()
    return details
