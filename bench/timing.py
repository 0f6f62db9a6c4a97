"""Wall-clock timing that is honest on CUDA: synchronise before every clock read, keep every sample.

Statistics are computed from the raw samples, which are kept in the results, so a reader can
recompute any other summary.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from .cpu_memory import call_memory


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so the host clock measures it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TimingStats:
    """Summary of repeated measurements in seconds: median, spread (min/max, IQR) and the samples."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    runs: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> "TimingStats":
        if not samples:
            raise ValueError("no timing samples")
        q1, q3 = (float(q) for q in np.percentile(samples, [25, 75]))
        return cls(statistics.median(samples), min(samples), max(samples), q1, q3, tuple(samples))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["runs"] = list(self.runs)
        data["iqr"] = self.iqr
        return data


def timed(function: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call takes, device work included; and its result."""
    _, wall, result = timed_with_host(function, device)
    return wall, result


def timed_with_host(function: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """(host seconds, wall seconds, result) of one call from an idle device: host until the call
    returned (work queued), wall until the device finished it. Equal on a CPU."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    host = time.perf_counter() - start
    synchronize(device)
    return host, time.perf_counter() - start, result


def repeat(function: Callable[[], Any], device: torch.device, runs: int) -> tuple[TimingStats, Any]:
    """`runs` timed calls (after whatever warm-up the caller did); stats and the last result."""
    samples, result = [], None
    for _ in range(runs):
        seconds, result = timed(function, device)
        samples.append(seconds)
    return TimingStats.of(samples), result


def release_cached_memory(device: torch.device) -> None:
    """Return the allocator's unused cached blocks to the GPU (CUDA Graph pools in use stay)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class MemoryPeak:
    """Peak device memory over a measured stretch, bytes; None with the reason off CUDA."""

    # Segments the caching allocator held: what the process takes from the GPU. CUDA Graph pools
    # count here but not below: a replay allocates nothing, its activations live in the pool.
    reserved: int | None
    allocated: int | None  # bytes of live tensors at the peak
    note: str | None = None
    parts: dict[str, int] | None = None  # CPU: resident_bytes + peak_during_bytes = allocated


class PeakMemory:
    """Peak memory between `start()` and `read()`: CUDA's allocator statistics, or on a CPU the
    tensor bytes of an extra call (`bench.cpu_memory`).

    Call `release_cached_memory` before the method's first call, so that the peak is its own
    working set, not blocks an earlier method left cached. A CPU has no caching allocator, so
    there `reserved` is None and `allocated` is the resident tensor storages plus the peak of an
    untimed, profiled call of `replay`, the second of two (the profiler would slow the timed calls).
    """

    CPU_NOTE = ("CPU: no allocator statistics; allocated = live tensor storages before an extra untimed "
                "end-to-end call (the second of two under the profiler) + that call's own peak from "
                "profiler memory events; no reserved")

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self, replay: Callable[[], Any]) -> MemoryPeak:
        if self.device.type == "cuda":
            synchronize(self.device)
            return MemoryPeak(int(torch.cuda.max_memory_reserved(self.device)),
                              int(torch.cuda.max_memory_allocated(self.device)))
        if self.device.type != "cpu":
            return MemoryPeak(None, None, f"not measured on {self.device.type}")
        memory = call_memory(replay)
        return MemoryPeak(None, memory.peak_bytes, self.CPU_NOTE, asdict(memory))
