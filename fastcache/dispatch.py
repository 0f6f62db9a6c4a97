"""The step dispatcher: for each U-Net call, refresh (full graph) or cached (shallow graph)?

Everything it reads lives on the host: a call counter, the scheduler's Python-side state and the
shapes of the inputs. It never reads a device value, so it never synchronises with the GPU
(DeepCache's helper looks the timestep up with ``.item()`` on every call).

Rules:

* `rearm()` runs at the start of every pipeline call: the first U-Net call after it is a refresh,
  whatever the previous call did (resolution, batch, strength, scheduler).
* Steps are counted as the user sees them. Second-order schedulers (Heun, DPM2, DPM++ SDE) call
  the U-Net twice per step; the scheduler says which evaluation comes next through its
  ``state_in_first_order`` flag, and both evaluations of a step take the same decision: a refresh
  step runs the full graph for its first evaluation and for its correction. (DeepCache maps the
  timestep to a step with ``timesteps.index(t)``, which is wrong there: Heun repeats timesteps.)
* PNDM in PLMS mode (SD 1.x's default) evaluates its second timestep twice: its timesteps are
  ``[t0, t1, t1, t2, ...]`` (21 calls for 20 steps). Its calls are numbered as DeepCache's
  ``timesteps.index(t)`` numbers them, counted from the pipeline call's first U-Net call: the
  position in that list, except that the repeat takes the number of the call before it. Text-to-
  image numbers its calls 0,1,1,3,4,...; an img2img or inpaint call with strength < 1 starts at
  position ``t_start`` of the same list, which gives 0,0,2,3,... (t_start 1), 0,2,3,4,... (t_start
  2) and 0,1,2,3,... (t_start 3 or more). So SD 1.x's default scheduler gives DeepCache's images at
  every interval and strength. The first call's position is read from tensor metadata: the
  pipeline's ``t`` is a view into ``scheduler.timesteps`` (`timestep_position`).
* A cached call is only allowed at the shape of the last refresh; any other shape refreshes.
* TGATE (tgate.py) re-arms DeepCache at given steps of a call (`rearm_at`): those refresh, and
  the schedule counts again from each, as DeepCache's helper does after ``disable(); enable()``.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable

import numpy as np
import torch

from .schedule import ExplicitSchedule, RefreshSchedule

logger = logging.getLogger("fastcache")

# Below this many steps (LCM, TCD, Turbo-style samplers) caching saves little and costs quality.
FEW_STEPS = 10


def steps_in_call(scheduler: Any) -> int | None:
    """How many user-visible steps the current pipeline call runs, from the scheduler's state.

    ``num_inference_steps`` less the steps an img2img pipeline skipped (recorded as the scheduler's
    ``begin_index``, counted in U-Net evaluations). None when the scheduler does not say.
    """
    num_steps = getattr(scheduler, "num_inference_steps", None)
    if not isinstance(num_steps, int):
        return None
    begin = getattr(scheduler, "begin_index", None)
    if isinstance(begin, int) and begin > 0:
        num_steps -= begin // max(int(getattr(scheduler, "order", 1)), 1)
    return max(num_steps, 1)


def is_second_evaluation(scheduler: Any) -> bool:
    """True when the next U-Net call is the correction of a second-order scheduler's step."""
    return getattr(scheduler, "state_in_first_order", True) is False


def timestep_position(scheduler: Any, timestep: Any) -> int | None:
    """Where `timestep` sits in ``scheduler.timesteps``, from tensor metadata only (no device read).

    diffusers' pipelines loop over ``scheduler.timesteps`` or a slice of it (img2img and inpaint
    skip the first ``t_start``), so each step's ``t`` is a view into the scheduler's tensor and its
    storage offset is its position. None for anything else (a Python number, a copy).
    """
    timesteps = getattr(scheduler, "timesteps", None)
    if not (torch.is_tensor(timestep) and torch.is_tensor(timesteps)) or timestep.numel() != 1 or timesteps.dim() != 1:
        return None
    if timestep.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr():
        return None
    offset, stride = timestep.storage_offset() - timesteps.storage_offset(), timesteps.stride(0)
    if stride <= 0 or offset % stride or not 0 <= offset // stride < len(timesteps):
        return None
    return offset // stride


def plms_timesteps(scheduler: Any) -> np.ndarray | None:
    """PNDM's timesteps in PLMS mode (``skip_prk_steps``), which it keeps on the host beside the
    device tensor; None for any other scheduler."""
    config = getattr(scheduler, "config", None)
    values = getattr(scheduler, "plms_timesteps", None)
    if getattr(config, "skip_prk_steps", False) is not True or not isinstance(values, np.ndarray):
        return None
    return values


def deepcache_numbers(scheduler: Any, start: int | None) -> tuple[int, ...] | None:
    """DeepCache's step number for each U-Net call of a pipeline call whose first call is at
    position `start` of ``scheduler.timesteps`` (None: unknown, taken as 0, text-to-image).

    DeepCache numbers a call ``timesteps.index(t)`` less the first call's number: the call's
    position, except that a repeated value takes the position where it first appears. Of the
    first-order schedulers only PNDM's PLMS mode repeats one; None (number = call index) for the
    others. Second-order schedulers repeat timesteps too but are counted by step (module docstring).
    """
    values = plms_timesteps(scheduler)
    if values is None:
        return None
    start = start if start is not None and start < len(values) else 0
    first_position: dict[int, int] = {}
    for position, value in enumerate(values.tolist()):
        first_position.setdefault(value, position)
    first = [first_position[value] for value in values[start:].tolist()]
    return tuple(number - first[0] for number in first)


class StepDispatcher:
    """Turns the sequence of U-Net calls of each pipeline call into refresh/cached decisions."""

    def __init__(self, schedule: RefreshSchedule) -> None:
        self.schedule = schedule
        self._forced: RefreshSchedule | None = None
        self._warned_few_steps = False
        self._warned_steps_past: set[int] = set()
        self.rearm()

    def rearm(self) -> None:
        """Start a new pipeline call: the next U-Net call refreshes."""
        self.step = -1
        self._num_steps: int | None = None
        self._numbers: tuple[int, ...] | None = None
        self._step_refreshes = True
        self._refreshed_key: Hashable | None = None
        self._start: int | None = None
        self._rearm_steps: frozenset[int] = frozenset()
        self._base = 0  # DeepCache's number of the latest (re-)armed step

    def rearm_at(self, steps: frozenset[int]) -> None:
        """This call also re-arms at `steps` (set before its first U-Net call; TGATE's gate)."""
        self._rearm_steps = steps

    def force(self, schedule: RefreshSchedule | None) -> None:
        """Use `schedule` instead of the configured one until called with None (warm-up)."""
        self._forced = schedule

    def locate(self, scheduler: Any, timestep: Any) -> None:
        """Note where the coming U-Net call's `timestep` sits in ``scheduler.timesteps``, before
        `next_call`. Only the first call of a pipeline call is read: DeepCache numbers the steps
        of a call from its first timestep's position (PNDM's img2img, `deepcache_numbers`)."""
        if self.step < 0:
            self._start = timestep_position(scheduler, timestep)

    def next_call(self, scheduler: Any, shape_key: Hashable) -> bool:
        """Decide the next U-Net call; True means refresh."""
        refresh, self.step, self._num_steps, self._numbers, self._step_refreshes, self._base = self._decide(
            scheduler, shape_key)
        if self.step == 0:  # warns once per handle (step 0 of Heun's second evaluation too)
            self._warn_if_few_steps(self._forced or self.schedule)
            self._warn_steps_past()
        if refresh:
            self._refreshed_key = shape_key
        return refresh

    def peek(self, scheduler: Any, shape_key: Hashable) -> bool:
        """What `next_call` would decide for a U-Net call at `shape_key` now, changing nothing.

        Valid until the scheduler's state or this dispatcher changes: in a pipeline, between the
        calls made for one denoising step before its U-Net call (the ControlNet's). Both methods
        run the same `_decide`, so they agree whenever the scheduler and the key are the same.
        """
        return self._decide(scheduler, shape_key)[0]

    def _decide(
        self, scheduler: Any, shape_key: Hashable
    ) -> tuple[bool, int, int | None, tuple[int, ...] | None, bool, int]:
        """(refresh, step, num_steps, numbers, step_refreshes, base) after the next call; reads state only."""
        step, num_steps, numbers, step_refreshes = self.step, self._num_steps, self._numbers, self._step_refreshes
        base = self._base
        if step < 0 or not is_second_evaluation(scheduler):
            step += 1
            schedule = self._forced or self.schedule
            if step == 0:
                num_steps = steps_in_call(scheduler)
                numbers = deepcache_numbers(scheduler, self._start)
            number = numbers[step] if numbers is not None and step < len(numbers) else step
            if step == 0 or step in self._rearm_steps:
                base = number
            number -= base
            step_refreshes = number == 0 or schedule.is_refresh(number, num_steps)
        refresh = step_refreshes or shape_key != self._refreshed_key
        return refresh, step, num_steps, numbers, step_refreshes, base

    def _warn_steps_past(self) -> None:
        """An explicit schedule's steps that this call never reaches: said once per call length."""
        schedule, num_steps = self.schedule, self._num_steps
        if (self._forced is not None or not isinstance(schedule, ExplicitSchedule) or num_steps is None
                or num_steps in self._warned_steps_past):
            return
        past = schedule.steps_past(num_steps)
        if past:
            self._warned_steps_past.add(num_steps)
            logger.warning(
                "schedule refresh step(s) %s are past the %d steps of this call and never run: it refreshes "
                "at steps %s only (steps count from 0 in each call). Said once per number of steps.",
                past, num_steps, sorted(step for step in schedule.steps | {0} if step < num_steps),
            )

    def _warn_if_few_steps(self, schedule: RefreshSchedule) -> None:
        if self._forced is not None or self._warned_few_steps or not schedule.caches:
            return
        if self._num_steps is not None and self._num_steps < FEW_STEPS:
            self._warned_few_steps = True
            logger.warning(
                "only %d denoising steps: few-step samplers (LCM, TCD, Turbo) change the deep features "
                "a lot from step to step, so cached steps save little and cost quality. fastcache "
                "keeps running the schedule (step 0 always refreshes); accelerate with cache_interval=1 "
                "to turn caching off for such calls. (Said once per handle.)",
                self._num_steps,
            )
