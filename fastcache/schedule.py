"""Refresh schedules: which denoising steps run the full U-Net.

Steps are counted as the user sees them (``num_inference_steps``), from 0 at the start of every
pipeline call. Step 0 is always a refresh. Schedules are pure host-side functions of the step
number; none looks at a device value.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InvalidConfigError

logger = logging.getLogger("fastcache")


class RefreshSchedule:
    """Decides whether step `step` of a call with `num_steps` steps refreshes the cache."""

    def is_refresh(self, step: int, num_steps: int | None) -> bool:
        raise NotImplementedError

    @property
    def caches(self) -> bool:
        """Whether any step can be a cached one (False: the shallow graph is never needed)."""
        return True


@dataclass(frozen=True)
class UniformSchedule(RefreshSchedule):
    """Refresh every `interval` steps (DeepCache's default; interval 1 turns caching off)."""

    interval: int

    def is_refresh(self, step: int, num_steps: int | None) -> bool:
        return step % self.interval == 0

    @property
    def caches(self) -> bool:
        return self.interval > 1


@dataclass(frozen=True)
class ExplicitSchedule(RefreshSchedule):
    """Refresh exactly at the given steps (and at step 0)."""

    steps: frozenset[int]

    def is_refresh(self, step: int, num_steps: int | None) -> bool:
        return step == 0 or step in self.steps

    def steps_past(self, num_steps: int) -> list[int]:
        """The listed refresh steps a call of `num_steps` steps never reaches (warned about)."""
        return sorted(step for step in self.steps if step >= num_steps)


@dataclass(frozen=True)
class QuadraticSchedule(RefreshSchedule):
    """DeepCache's non-uniform schedule: refreshes densest around step `center`.

    The same number of refreshes as the uniform schedule, ``ceil(num_steps / interval)``, placed by
    DeepCache's ``sample_from_quad_center`` (reproduced by `deepcache_quadratic_steps`). Where
    DeepCache finds no placement (it raises) this falls back to the uniform schedule and warns.
    """

    interval: int
    center: int = 15
    power: float = 1.4

    def is_refresh(self, step: int, num_steps: int | None) -> bool:
        if num_steps is None:
            return step % self.interval == 0
        return step in _quadratic_or_uniform(num_steps, self.interval, self.center, self.power)

    @property
    def caches(self) -> bool:
        return self.interval > 1


def deepcache_quadratic_steps(num_steps: int, num_refreshes: int, center: int, power: float) -> list[int]:
    """DeepCache 0.1.1's ``sample_from_quad_center``, step list only, with identical numerics.

    Points evenly spaced in ``x**(1/power)`` space between ``-center`` and ``num_steps - center``
    are mapped back with ``x**power``; the power is lowered in 0.02 steps until the rounded points
    are distinct. The root of a negative base is complex in Python; like DeepCache we keep the real
    part of the result, which gives its denser spacing near `center`.
    """
    while power > 1:
        low, high = (-center) ** (1 / power), (num_steps - center) ** (1 / power)  # complex if < 0
        points = np.linspace(low, high, num_refreshes + 1) ** power
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's ComplexWarning: the imaginary part is dropped
            rounded = np.unique(np.int32(points))
        steps = [0] + [int(value) + center for value in rounded[1:-1]]
        if len(steps) == num_refreshes:
            return sorted(steps)
        power -= 0.02
    raise InvalidConfigError(
        f"no quadratic schedule with {num_refreshes} refreshes in {num_steps} steps around center={center}"
    )


@functools.lru_cache(maxsize=256)
def _quadratic_or_uniform(num_steps: int, interval: int, center: int, power: float) -> frozenset[int]:
    if interval == 1:
        return frozenset(range(num_steps))
    try:
        return frozenset(deepcache_quadratic_steps(num_steps, math.ceil(num_steps / interval), center, power))
    except InvalidConfigError as error:
        logger.warning("%s; using the uniform schedule (every %d steps) for this call", error, interval)
        return frozenset(range(0, num_steps, interval))


# The largest quadratic `power`: DeepCache's placement lowers the power by 0.02 until the steps
# are distinct, so the power bounds its loop (450 rounds at most here; an infinite one never ends).
MAX_POWER = 10.0


def _is_int(value: object) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def check_quadratic_parameters(center: object, power: object) -> None:
    """`center` and `power` of the quadratic schedule (checked whatever the schedule: they are
    accelerate() arguments, and a wrong one is a mistake even where it is unused)."""
    if not _is_int(center) or center < 0:  # type: ignore[operator]
        raise InvalidConfigError(f"center must be an int >= 0 (a step number), got {center!r}")
    if (
        isinstance(power, (bool, np.bool_))
        or not isinstance(power, (int, float, np.integer, np.floating))
        or not math.isfinite(power)
        or not 1 < power <= MAX_POWER
    ):
        raise InvalidConfigError(
            f"power must be a finite number in (1, {MAX_POWER:g}] (DeepCache's default is 1.4), got {power!r}"
        )


def make_schedule(
    schedule: str | Sequence[int], cache_interval: int, center: int = 15, power: float = 1.4
) -> RefreshSchedule:
    """Build a schedule from accelerate()'s arguments, validating them."""
    if not _is_int(cache_interval) or cache_interval < 1:
        raise InvalidConfigError(f"cache_interval must be an int >= 1 (1 turns caching off), got {cache_interval!r}")
    check_quadratic_parameters(center, power)
    if isinstance(schedule, str):
        if schedule == "uniform":
            return UniformSchedule(int(cache_interval))
        if schedule == "quadratic":
            return QuadraticSchedule(int(cache_interval), int(center), float(power))
        raise InvalidConfigError(
            f"unknown schedule {schedule!r}: use 'uniform', 'quadratic' or a list of refresh steps"
        )
    steps = list(schedule) if isinstance(schedule, (list, tuple, range, np.ndarray)) else None
    if not steps or any(not _is_int(s) or s < 0 for s in steps):
        raise InvalidConfigError(
            f"schedule must be 'uniform', 'quadratic' or a non-empty list of step numbers >= 0, got {schedule!r}"
        )
    return ExplicitSchedule(frozenset(int(s) for s in steps))
