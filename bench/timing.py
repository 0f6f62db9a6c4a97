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
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def repeat(function: Callable[[], Any], device: torch.device, runs: int) -> tuple[TimingStats, Any]:
    """`runs` timed calls (after whatever warm-up the caller did); stats and the last result."""
    samples, result = [], None
    for _ in range(runs):
        seconds, result = timed(function, device)
        samples.append(seconds)
    return TimingStats.of(samples), result


class PeakMemory:
    """Peak device memory allocated by torch between `start()` and `read()`, CUDA only.

    On other devices the figure is None with the reason: torch has no comparable allocator
    statistic for CPU tensors, and a process RSS would mix in everything else the process holds.
    """

    CPU_REASON = "not measured: torch.cuda.max_memory_allocated exists for CUDA devices only (CPU run)"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> tuple[int | None, str | None]:
        """(bytes, None) on CUDA; (None, reason) elsewhere."""
        if self.device.type != "cuda":
            return None, self.CPU_REASON
        synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device)), None
