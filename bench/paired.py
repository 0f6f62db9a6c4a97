"""Paired timing: each method on its own copy of the pipeline, called in turn, round after round.

    python -m bench paired --preset cpu-small --res 192 --steps 25 \
        --methods fastcache:I3B0,fastcache:I3B0G10,tgate:I3B0G10 --rounds 10

``bench run`` times one method after another, so a slow stretch of a shared machine (another
process, a hot neighbour) lands on whichever method runs then; on this project's 2-core machine
the same eager call has moved 20-30% between minutes. Here every round calls every method once
(denoising loop only: precomputed embeddings, latent output; the order rotates each round), and
each method's speed-up over the first is the median of its per-round ratios: a slow stretch that
covers a round slows both sides of its ratios alike.

Every copy is built from the same preset and seed (the same weights); each method is enabled and
warmed (fastcache: accelerate + warmup; one untimed call for all) before the first round, and all
stay enabled until the last. Sanity: each method's final latents against the first method's
(relative L2), as ``bench run``'s quality tables do against eager.
"""

from __future__ import annotations

import argparse
import shlex
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .args import DEFAULT_PROMPT, RESULTS, cuda_graphs, option, torch_dtype
from .methods import CacheConfig, CompileSettings, Compile, DeepCache, Eager, FastCache, Method, Shape, Tgate
from .timing import TimingStats, synchronize, timed

def parse_inductor_options(text: str) -> dict[str, Any]:
    """``layout_optimization=false;freezing=true`` -> {"layout_optimization": False, "freezing": True}."""
    options = {}
    for part in text.split(";"):
        try:
            name, value = option(part)
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"inductor option {error}") from None
        options[name] = value
    return options


def parse_method(text: str, settings: CompileSettings) -> Method:
    """``eager``, ``compile``, or ``<deepcache|tgate|fastcache>:<config>`` (e.g. fastcache:I3B0G10).

    A fastcache method may end in inductor options for it alone, ``fastcache:I3B0[layout_optimization=true]``
    (``;`` between several), to time fastcache's compile settings against each other in one run.
    """
    text = text.strip()
    if text.startswith("fastcache:") and text.endswith("]") and "[" in text:
        head, _, options = text[:-1].partition("[")
        method = parse_method(head, settings)
        assert isinstance(method, FastCache)
        compile_options = parse_inductor_options(options)
        own = replace(settings, fastcache_options=settings.fastcache_options + (("compile_options", compile_options),))
        return FastCache(method.config, own, variant=options)
    kind, _, config = text.partition(":")
    if kind in ("eager", "compile") and not config:
        return Eager() if kind == "eager" else Compile(settings)
    if kind in ("deepcache", "tgate", "fastcache") and config:
        parsed = CacheConfig.parse(config)
        if kind == "deepcache" and parsed.gate is not None:
            raise ValueError(f"{text!r}: DeepCache has no gate; use tgate:{parsed.label}")
        if kind == "tgate" and parsed.gate is None:
            raise ValueError(f"{text!r}: the tgate package needs a gate, e.g. tgate:{parsed.label}G10")
        if kind == "deepcache":
            return DeepCache(parsed)
        return Tgate(parsed) if kind == "tgate" else FastCache(parsed, settings)
    raise ValueError(f"{text!r} is not one of eager, compile, deepcache:<config>, tgate:<config>G<gate>, "
                     "fastcache:<config>, fastcache:<config>[NAME=VALUE;...]")


@dataclass
class PairedMethod:
    label: str
    seconds: TimingStats  # denoising call, per round
    speedup: TimingStats  # the first method's seconds / this one's, per round
    latent_rel_l2: float  # final latents against the first method's
    setup_s: float


@dataclass
class PairedResult:
    meta: dict[str, Any]
    methods: list[PairedMethod] = field(default_factory=list)
    order: list[list[str]] = field(default_factory=list)  # the call order of each round
    load_average: list[list[float] | None] = field(default_factory=list)  # after each round


def measure(preset: Any, methods: list[Method], shape: Shape, steps: int, rounds: int, prompt: str, seed: int,
            guidance: float, device: torch.device, dtype: torch.dtype) -> PairedResult:
    from .env import load_average
    from .metrics import relative_l2
    from .runner import log
    from .workload import Workload

    result = PairedResult(meta={})
    workloads: list[Workload] = []
    setups: list[float] = []
    try:
        for method in methods:
            log(f"paired: building and enabling {method.label}")
            pipe = preset.build(device, dtype, seed)
            workload = Workload(pipe, shape, steps, prompt, seed, guidance)
            workload.prepare()
            start = time.perf_counter()
            method.enable(pipe, shape, workload.call_kwargs())
            workloads.append(workload)
            workload.denoise()  # untimed: `compile` compiles here
            synchronize(device)
            setups.append(time.perf_counter() - start)
        seconds: list[list[float]] = [[] for _ in methods]
        latents: list[Any] = [None] * len(methods)
        for index in range(rounds):
            order = [(index + k) % len(methods) for k in range(len(methods))]
            for m in order:
                elapsed, latents[m] = timed(workloads[m].denoise, device)
                seconds[m].append(elapsed)
            result.order.append([methods[m].label for m in order])
            result.load_average.append(load_average())
            log(f"paired: round {index + 1}/{rounds}: " + ", ".join(
                f"{methods[m].label} {seconds[m][-1]:.3f} s" for m in range(len(methods))))
    finally:
        for method in methods[: len(workloads)]:
            method.disable()
    reference = latents[0].detach().double().cpu().numpy()
    for m, method in enumerate(methods):
        ratios = [base / own for base, own in zip(seconds[0], seconds[m])]
        result.methods.append(PairedMethod(
            method.label, TimingStats.of(seconds[m]), TimingStats.of(ratios),
            relative_l2(latents[m].detach().double().cpu().numpy(), reference), setups[m]))
    return result


def markdown(result: PairedResult) -> str:
    meta = result.meta
    env = meta["environment"]
    versions = env["versions"]
    first = result.methods[0].label
    lines = [
        f"# fastcache paired timing: `{meta['preset']}`", "",
        f"{meta['shape']}, {meta['steps']} steps, guidance {meta['guidance_scale']}, {meta['dtype']} on "
        f"{env['device_name']}; {meta['rounds']} rounds, every method once per round in a rotated order "
        "(denoising loop only: precomputed embeddings, latent output).", "",
        f"torch {versions['torch']}, diffusers {versions['diffusers']}, DeepCache {versions['DeepCache']}, "
        f"fastcache {versions['fastcache']} (commit {env['git_commit']}), python {env['python']}, "
        f"{env['cpu_count']} CPUs, {env['torch_threads']} torch threads; load average at the start "
        f"{env['load_average_at_start']}, at the end {meta['load_average_at_end']}; whole run {meta['total_s']:.0f} s.",
        "", f"Command: `{meta['command']}`", "",
        f"`speed-up over {first}`: the median [min, max] of the per-round ratios ({first}'s seconds / the "
        "method's, both from the same round).", "",
        f"| method | seconds: median [min, max] | IQR | speed-up over {first}: median [min, max] | "
        f"latents vs {first}: rel. L2 | setup + first call s |",
        "|---|---|---|---|---|---|",
    ]
    for m in result.methods:
        s, r = m.seconds, m.speedup
        lines.append(f"| {m.label} | {s.median:.4g} [{s.min:.4g}, {s.max:.4g}] | {s.iqr:.3g} | "
                     f"**{r.median:.3f}x** [{r.min:.3f}, {r.max:.3f}] | {m.latent_rel_l2:.3g} | {m.setup_s:.1f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .presets import PRESETS

    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--res", type=int, default=None, help="square resolution (default: the preset's)")
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--methods", required=True,
                        help="comma-separated: eager, compile, deepcache:<config>, tgate:<config>G<gate>, "
                             "fastcache:<config>, fastcache:<config>[NAME=VALUE;...] (inductor options for that "
                             "one); the first is the baseline of the ratios")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a shared machine one thread is steadier")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--out", default=RESULTS, help="folder for the result files")


def main(args: argparse.Namespace, argv: list[str]) -> int:
    from .env import environment, load_average
    from .presets import get_preset
    from .results import to_jsonable, write_result_files

    started = time.time()
    preset = get_preset(args.preset)
    settings = CompileSettings(args.compile_backend, None, cuda_graphs(args.cuda_graphs))
    try:
        methods = [parse_method(text, settings) for text in args.methods.split(",") if text.strip()]
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if len(methods) < 2 or args.rounds < 1:
        raise SystemExit("--methods needs at least two methods and --rounds at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch_dtype(args.dtype, device)
    size = args.res or preset.resolution
    shape = Shape(size, size, args.batch)
    steps = args.steps or preset.steps
    environment_at_start = environment(device)
    result = measure(preset, methods, shape, steps, args.rounds, args.prompt, args.seed, args.guidance, device, dtype)
    result.meta = {
        "command": "python -m bench " + shlex.join(argv), "preset": preset.name, "shape": shape.label,
        "steps": steps, "rounds": args.rounds, "guidance_scale": args.guidance, "seed": args.seed,
        "prompt": args.prompt, "dtype": str(dtype).replace("torch.", ""), "environment": environment_at_start,
        "load_average_at_end": load_average(), "total_s": time.time() - started,
    }
    stem = f"paired-{preset.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}"
    text = markdown(result)
    paths = write_result_files(args.out, stem, to_jsonable(result), text)
    print(text)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0
