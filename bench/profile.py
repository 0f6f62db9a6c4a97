"""Where the time goes: torch profiler breakdowns of U-Net steps and of a whole pipeline call.

    python -m bench.profile --preset sd15 --res 512 --batch 1 --steps 50 --configs I3B0

For each method (eager, compile, fastcache at each config) this profiles

* one refresh and one cached step (a full step for methods without caching), called directly with
  the pipeline's real inputs: the device time of its kernels by category (convolution, GEMM,
  attention, normalisation, copies, other) and the gap between the step's wall time and its busy
  time (launch overhead and host work the device waits for);
* one end-to-end pipeline call, split into regions by temporary ``record_function`` labels around
  the text encoder(s), each U-Net call, ``scheduler.step`` and ``vae.decode``; the rest is the
  pipeline's own Python and the CFG arithmetic between U-Net calls.

On CUDA the categories are the kernels' device time; on CPU, the self time of aten ops (the CPU is
the device). Wall times are medians of unprofiled runs; profiles are of separate runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from .methods import CACHED, FULL, REFRESH, Method
from .timing import TimingStats, repeat, synchronize, timed

# Checked in this order: the first pattern matching a kernel or op name (lower-cased) wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"scaled_dot_product|flash|fmha|attention|sdpa|cudnn_attn"),
    ("convolution", r"conv(olution|2d|_)|fprop|implicit_gemm|winograd"),
    ("gemm", r"gemm|matmul|cutlass|xmma|sm\d+_|(^|_|::)(mm|addmm|bmm|baddbmm)(_|$)"),
    ("normalisation", r"group_norm|layer_norm|rms_norm|batch_norm"),
    ("copies", r"copy|clone|memcpy|memset|contiguous|(^|_|::)cat(_|$)"),
)
REGIONS = ("text_encoder", "unet", "scheduler.step", "vae.decode")


# Inductor's generated kernels are named after the aten ops they fuse, including the convolution
# or matmul whose epilogue (bias add, residual add) they carry: "triton_poi_fused_add_convolution_3",
# "triton_red_fused_convolution_native_group_norm_1". Those ops themselves run as extern kernels
# (cuDNN, cuBLAS), so in a pointwise/reduction kernel's name they say nothing about its work; only
# templates ("triton_tem_fused_mm_3") do a convolution or GEMM in Triton.
_INDUCTOR_FUSED = re.compile(r"^(triton_(poi|per|red)|cpp)_fused_")
_EXTERN_OPS_IN_NAME = re.compile(r"_(convolution|addmm|baddbmm|bmm|mm|_?scaled_dot_product\w*?attention)(?=_|$)")


def category(name: str) -> str:
    lowered = name.lower()
    if _INDUCTOR_FUSED.match(lowered):
        lowered = _EXTERN_OPS_IN_NAME.sub("", lowered)
    for label, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return label
    return "other"


@dataclass
class Breakdown:
    """Busy time of one profiled region by category, in seconds, and its biggest items."""

    busy_s: float
    by_category: dict[str, float]
    top: list[tuple[str, float]]


def device_breakdown(profiler: Any, device: torch.device, calls: int = 1, top: int = 8) -> Breakdown:
    """Per-call busy time by category: CUDA kernels' device time, or aten ops' self CPU time."""
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    for event in profiler.key_averages():
        if device.type == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            microseconds = event.self_device_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            microseconds = event.self_cpu_time_total
        if microseconds > 0:
            totals[event.key] = totals.get(event.key, 0.0) + microseconds * 1e-6 / calls
    by_category: dict[str, float] = {label: 0.0 for label, _ in CATEGORIES}
    by_category["other"] = 0.0
    for name, seconds in totals.items():
        by_category[category(name)] += seconds
    biggest = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return Breakdown(sum(totals.values()), by_category, biggest)


def _profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


@dataclass
class StepProfile:
    kind: str  # full, refresh or cached
    wall: TimingStats
    breakdown: Breakdown

    @property
    def gap_s(self) -> float:
        """Wall time the device was not busy with this step's work (launches, host, syncs)."""
        return max(0.0, self.wall.median - self.breakdown.busy_s)


def profile_steps(method: Method, pipe: Any, inputs: Any, device: torch.device, runs: int) -> list[StepProfile]:
    """Profile the first call (full or refresh) and the second (cached, if the method caches)."""
    kinds: dict[str, list[float]] = {}
    profiled: dict[str, Breakdown] = {}
    with torch.no_grad():
        for run in range(runs + 1):
            method.begin_direct_calls()
            for index in (0, 1):
                if run < runs:
                    seconds, _ = timed(lambda: inputs.call(pipe.unet, index), device)
                    kinds.setdefault(method.last_call_kind(), []).append(seconds)
                    continue
                with _profiler(device) as profiler:  # the last pass: profiled, not timed
                    inputs.call(pipe.unet, index)
                    synchronize(device)
                profiled[method.last_call_kind()] = device_breakdown(profiler, device)
    return [StepProfile(kind, TimingStats.of(kinds[kind]), profiled[kind]) for kind in (FULL, REFRESH, CACHED)
            if kind in kinds]


@contextlib.contextmanager
def labelled_regions(pipe: Any) -> Iterator[None]:
    """Wrap the pipeline's parts in record_function labels (instance attributes, removed after)."""
    targets: list[tuple[Any, str, str]] = []
    for attribute in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, attribute, None)
        if module is not None:
            targets.append((module, "forward", "text_encoder"))
    targets += [(pipe.unet, "forward", "unet"), (pipe.scheduler, "step", "scheduler.step"),
                (pipe.vae, "decode", "vae.decode")]
    saved = []
    for owner, name, label in targets:
        had_own = name in vars(owner)
        original = getattr(owner, name)

        def wrapped(*args: Any, __original: Callable[..., Any] = original, __label: str = label, **kwargs: Any) -> Any:
            with torch.profiler.record_function(__label):
                return __original(*args, **kwargs)

        functools.update_wrapper(wrapped, original)
        saved.append((owner, name, had_own, vars(owner).get(name)))
        setattr(owner, name, wrapped)
    try:
        yield
    finally:
        for owner, name, had_own, previous in reversed(saved):
            if had_own:
                setattr(owner, name, previous)
            else:
                delattr(owner, name)


@dataclass
class CallProfile:
    """One end-to-end call: wall time, and per region its count and host/device seconds."""

    wall: TimingStats
    regions: dict[str, dict[str, float]]
    breakdown: Breakdown

    @property
    def rest_s(self) -> float:
        """Wall time outside the labelled regions: pipeline Python, CFG arithmetic, latents prep."""
        return max(0.0, self.wall.median - sum(region["host_s"] for region in self.regions.values()))


def profile_call(call: Callable[[], Any], pipe: Any, device: torch.device, runs: int) -> CallProfile:
    wall, _ = repeat(call, device, runs)
    with labelled_regions(pipe), _profiler(device) as profiler:
        call()
        synchronize(device)
    regions: dict[str, dict[str, float]] = {}
    for event in profiler.key_averages():
        if event.key in REGIONS:
            regions[event.key] = {
                "count": event.count,
                "host_s": event.cpu_time_total * 1e-6,
                "device_s": event.device_time_total * 1e-6 if device.type == "cuda" else event.cpu_time_total * 1e-6,
            }
    return CallProfile(wall, regions, device_breakdown(profiler, device))


@dataclass
class MethodProfile:
    method: str
    steps: list[StepProfile]
    call: CallProfile
    setup_s: float
    details: dict[str, Any] = field(default_factory=dict)


def profile_method(method: Method, workload: Any, device: torch.device, runs: int) -> MethodProfile:
    pipe = workload.pipe
    start = time.perf_counter()
    details = method.enable(pipe, workload.shape, workload.call_kwargs())
    try:
        workload.end_to_end()  # first image: compiles and captures, untimed
        setup = time.perf_counter() - start
        inputs = workload.capture_unet_inputs()
        steps = profile_steps(method, pipe, inputs, device, runs)
        call = profile_call(workload.end_to_end, pipe, device, runs)
    finally:
        method.disable()
    return MethodProfile(method.label, steps, call, setup, details)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def markdown(profiles: list[MethodProfile], header: dict[str, Any]) -> str:
    lines = [f"# Profile: {header['preset']} {header['shape']}, {header['steps']} steps", "",
             f"Device: {header['device']}; torch {header['torch']}; command: `{header['command']}`", "",
             "## U-Net steps (ms per call; categories are device busy time)", ""]
    labels = [label for label, _ in CATEGORIES] + ["other"]
    lines.append("| method | step | wall | busy | gap | " + " | ".join(labels) + " |")
    lines.append("|---" * (5 + len(labels)) + "|")
    for profile in profiles:
        for step in profile.steps:
            cells = [_ms(step.breakdown.by_category[label]) for label in labels]
            lines.append(f"| {profile.method} | {step.kind} | {_ms(step.wall.median)} | {_ms(step.breakdown.busy_s)} | "
                         f"{_ms(step.gap_s)} | " + " | ".join(cells) + " |")
    lines += ["", "## End-to-end call (ms; host time inside each labelled region, count of calls)", "",
              "| method | wall | " + " | ".join(REGIONS) + " | rest (pipeline Python, CFG) |",
              "|---" * (3 + len(REGIONS)) + "|"]
    for profile in profiles:
        cells = []
        for region in REGIONS:
            data = profile.call.regions.get(region)
            cells.append(f"{_ms(data['host_s'])} ({int(data['count'])})" if data else "-")
        lines.append(f"| {profile.method} | {_ms(profile.call.wall.median)} | " + " | ".join(cells)
                     + f" | {_ms(profile.call.rest_s)} |")
    lines += ["", "## Biggest kernels/ops per step (ms)", ""]
    for profile in profiles:
        for step in profile.steps:
            top = ", ".join(f"`{name[:60]}` {_ms(seconds)}" for name, seconds in step.breakdown.top[:5])
            lines.append(f"- {profile.method} {step.kind}: {top}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from .args import ints, option, sizes

    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--res", type=sizes, default=None)
    parser.add_argument("--batch", type=ints, default=[1])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--configs", default="I3B0")
    parser.add_argument("--methods", default="eager,compile,fastcache", help="any of eager, compile, fastcache")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--fastcache-option", type=option, action="append", default=[], metavar="NAME=VALUE",
                        help="another fastcache.accelerate keyword (as in bench run); repeatable")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return parser


def main(argv: list[str] | None = None) -> int:
    import sys

    from .env import environment
    from .methods import CacheConfig, CompileSettings, Compile, Eager, FastCache, Shape
    from .presets import get_preset
    from .workload import Workload

    args = build_parser().parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    preset = get_preset(args.preset)
    pipe = preset.build(device, dtype, 0)
    settings = CompileSettings(backend=args.backend, fastcache_options=tuple(args.fastcache_option))
    chosen = set(args.methods.split(","))
    methods: list[Method] = []
    if "eager" in chosen:
        methods.append(Eager())
    if "compile" in chosen:
        methods.append(Compile(settings))
    if "fastcache" in chosen:
        methods += [FastCache(CacheConfig.parse(text), settings) for text in args.configs.split(",")]
    written = []
    for width, height in args.res or [(preset.resolution, preset.resolution)]:
        for batch in args.batch:
            shape = Shape(width, height, batch)
            workload = Workload(pipe, shape, args.steps or preset.steps, "a photo of an astronaut", 0, 7.5)
            profiles = [profile_method(method, workload, device, args.runs) for method in methods]
            env = environment(device)
            header = {"preset": args.preset, "shape": shape.label, "steps": workload.steps,
                      "device": env.get("device_name", str(device)), "torch": torch.__version__,
                      "command": "python -m bench.profile " + " ".join(argv if argv is not None else sys.argv[1:])}
            stem = f"profile-{args.preset}-{width}x{height}-b{batch}-{device.type}"
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, stem + ".md"), "w") as handle:
                handle.write(markdown(profiles, header))
            with open(os.path.join(args.out, stem + ".json"), "w") as handle:
                json.dump({"header": header, "environment": env, "profiles": [asdict(p) for p in profiles]},
                          handle, indent=1, default=str)
            written.append(stem)
            print(markdown(profiles, header))
    print("wrote", ", ".join(f"{args.out}/{stem}.md" for stem in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
