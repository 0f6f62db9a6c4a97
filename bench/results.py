"""Result records of a benchmark run; every number in them is measured or derived from measurements.

`to_jsonable` writes non-finite floats as the strings "inf", "-inf" and "nan" (strict JSON has no
such numbers; PSNR of identical images is legitimately infinite).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .timing import TimingStats


@dataclass
class Quality:
    """One output against another: PSNR (dB) and SSIM of decoded images, relative L2 of latents."""

    psnr: float
    ssim: float
    latent_rel_l2: float


@dataclass
class StepTimes:
    """Seconds per direct U-Net call, by what the call ran (full U-Net, refresh, cached).

    Wall time runs from an idle device to the call's work finished; host time until the call
    returned to Python (on CUDA, work queued but not necessarily run). Host close to wall means
    the step is bound by the host issuing it, and a loop of such steps leaves the GPU waiting.
    """

    full: TimingStats | None = None
    refresh: TimingStats | None = None
    cached: TimingStats | None = None
    pattern: list[str] = field(default_factory=list)  # kind of every timed call, in order
    note: str | None = None
    full_host: TimingStats | None = None
    refresh_host: TimingStats | None = None
    cached_host: TimingStats | None = None


@dataclass
class LoopCalls:
    """The U-Net calls inside denoising pipeline calls (untimed extra runs, each call timed from an
    idle device to its work finished): where a pipeline call's time goes, step by step.

    Groups are by what the call ran, where the method says (fastcache: refresh or cached, and the
    batch rows it ran: half the pipeline's after a TGATE gate); a method that does not say has one
    group of all its calls. `loop` is each run's whole pipeline call; `unet` the sum of its U-Net
    calls; the rest (text-free here: embeddings are precomputed) is the scheduler and the loop's
    own Python.
    """

    groups: dict[str, TimingStats]
    labels: list[str]  # the group of each U-Net call, in order
    per_call_median: list[float]  # median seconds of each U-Net call position over the runs
    unet: TimingStats
    loop: TimingStats


@dataclass
class MethodResult:
    """Everything measured for one method (and config) at one shape."""

    method: str
    config: str | None
    label: str
    setup_s: float  # enable(): for fastcache accelerate + warmup (compile, and capture on CUDA)
    first_image_s: float  # setup + the first end-to-end call (compiles there for `compile`)
    compile_cache: dict[str, int]  # inductor FX-graph cache hits/misses during setup + first image
    details: dict[str, Any]
    end_to_end: TimingStats
    denoise: TimingStats
    steps: StepTimes
    # CUDA: over the timed runs. Reserved is what the process holds from the GPU, CUDA Graph pools
    # included; allocated misses a graph's activations (a replay allocates nothing), so methods are
    # compared by reserved. CPU: no reserved; allocated is the tensor bytes of an extra call (the
    # second of two, bench.cpu_memory), and methods are compared by it. The note says which.
    peak_reserved_bytes: int | None
    peak_allocated_bytes: int | None
    peak_memory_note: str | None
    restored: bool  # the pipeline had its original class and no patched forward after disable()
    outputs_finite: bool  # no NaN/inf in the images and latents (random fp16 weights could overflow)
    load_average: list[float] | None = None  # 1/5/15 min after this method: competing processes show here
    refresh_pattern: list[bool] | None = None  # fastcache: last pipeline call's decisions (True = refresh)
    loop_calls: LoopCalls | None = None
    quality_vs_eager: Quality | None = None
    speedup_end_to_end: float | None = None  # eager median / this median
    speedup_denoise: float | None = None


@dataclass
class Agreement:
    """DeepCache and fastcache at one config: against each other and each against eager."""

    config: str
    fastcache_vs_deepcache: Quality
    deepcache_vs_eager: Quality
    fastcache_vs_eager: Quality
    # rel. L2 (latents) of each against eager, divided by theirs against each other.
    closeness_ratio: float
    speedup_end_to_end: float  # deepcache median / fastcache median
    speedup_denoise: float


@dataclass
class RestartResult:
    """A fresh process doing accelerate + warmup with inductor's on-disk cache already filled."""

    config: str
    shape: str
    process_s: float  # wall time of the whole subprocess, interpreter start to exit
    import_s: float
    build_s: float
    accelerate_warmup_s: float
    first_image_after_warmup_s: float
    compilations: int
    compile_cache: dict[str, int]


@dataclass
class ShapeResult:
    width: int
    height: int
    batch: int
    unet_batch: int  # rows of a U-Net call (2x batch with classifier-free guidance)
    methods: list[MethodResult] = field(default_factory=list)
    agreements: list[Agreement] = field(default_factory=list)
    floor: Any = None  # bench.floor.ShapeFloor: each method's steps against the card's matrix rate

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height} b{self.batch}"

    def get(self, label: str) -> MethodResult:
        return next(m for m in self.methods if m.label == label)


@dataclass
class BenchResult:
    meta: dict[str, Any]
    shapes: list[ShapeResult] = field(default_factory=list)
    restarts: list[RestartResult] = field(default_factory=list)


def to_jsonable(value: Any) -> Any:
    """Dataclasses, TimingStats and floats as strict-JSON values."""
    if isinstance(value, TimingStats):
        return to_jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


_STAMPED = re.compile(r"^(?P<kind>.+)-(?P<stamp>\d{8}-\d{6})\.json$")
INDEX = "INDEX.md"


def write_result_files(out: str, stem: str, data: Any, text: str) -> dict[str, str]:
    """`data` as ``<out>/<stem>.json`` (strict JSON: pass non-finite floats through
    `to_jsonable`) and `text` as ``<stem>.md``, then `INDEX` rewritten; returns the paths."""
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, stem + ".json"), "markdown": os.path.join(out, stem + ".md")}
    with open(paths["json"], "w") as handle:
        json.dump(data, handle, indent=1, allow_nan=False)
    with open(paths["markdown"], "w") as handle:
        handle.write(text)
    paths["index"] = write_index(out)
    return paths


def latest_results(out: str) -> dict[str, str]:
    """The newest ``<kind>-<YYYYmmdd-HHMMSS>`` stem of each kind of result in `out`."""
    latest: dict[str, str] = {}
    for name in sorted(os.listdir(out)):
        match = _STAMPED.match(name)
        if match:  # sorted: a later stamp of the same kind replaces an earlier one
            latest[match["kind"]] = name[: -len(".json")]
    return latest


def write_index(out: str) -> str:
    """``<out>/INDEX.md``: a link to the newest result of each kind (instead of copies of them)."""
    lines = ["# Latest results", "",
             "The newest run of each kind in this folder (`python -m bench ...` rewrites this file; older runs "
             "stay beside it, each with the command, versions and device that produced it).", "",
             "| kind | newest | data |", "|---|---|---|"]
    for kind, stem in sorted(latest_results(out).items()):
        lines.append(f"| {kind} | [{stem}.md]({stem}.md) | [json]({stem}.json) |")
    path = os.path.join(out, INDEX)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path
