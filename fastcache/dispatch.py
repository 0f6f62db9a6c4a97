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
* PNDM in PLMS mode (SD 1.x's default) evaluates its second timestep twice (21 calls for 20
  steps). The repeated call takes the decision of the call before it and step numbers go on by
  call, which is exactly what DeepCache's ``timesteps.index(t)`` gives there (steps 0,1,1,3,4,...),
  so SD 1.x's default scheduler gives DeepCache's images at every interval.
* A cached call is only allowed at the shape of the last refresh; any other shape refreshes.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable

from .schedule import RefreshSchedule

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


def repeats_timestep(scheduler: Any) -> bool:
    """True when the next call re-evaluates the previous call's timestep (PNDM's PLMS warm-up).

    PNDM with ``skip_prk_steps`` has timesteps ``[t0, t1, t1, t2, ...]``: its second call corrects
    the first step, its third starts again from ``t1``. That third call is the only one made with
    ``counter == 2`` while a single model output is stored in ``ets``.
    """
    config = getattr(scheduler, "config", None)
    return (
        getattr(config, "skip_prk_steps", False) is True
        and getattr(scheduler, "counter", None) == 2
        and len(getattr(scheduler, "ets", ())) == 1
    )


class StepDispatcher:
    """Turns the sequence of U-Net calls of each pipeline call into refresh/cached decisions."""

    def __init__(self, schedule: RefreshSchedule) -> None:
        self.schedule = schedule
        self._forced: RefreshSchedule | None = None
        self._warned_few_steps = False
        self.rearm()

    def rearm(self) -> None:
        """Start a new pipeline call: the next U-Net call refreshes."""
        self.step = -1
        self._num_steps: int | None = None
        self._step_refreshes = True
        self._refreshed_key: Hashable | None = None

    def force(self, schedule: RefreshSchedule | None) -> None:
        """Use `schedule` instead of the configured one until called with None (warm-up)."""
        self._forced = schedule

    def next_call(self, scheduler: Any, shape_key: Hashable) -> bool:
        """Decide the next U-Net call; True means refresh."""
        refresh, self.step, self._num_steps, self._step_refreshes = self._decide(scheduler, shape_key)
        if self.step == 0:  # warns once per handle (step 0 of Heun's second evaluation too)
            self._warn_if_few_steps(self._forced or self.schedule)
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

    def _decide(self, scheduler: Any, shape_key: Hashable) -> tuple[bool, int, int | None, bool]:
        """(refresh, step, num_steps, step_refreshes) after the next call; reads state only."""
        step, num_steps, step_refreshes = self.step, self._num_steps, self._step_refreshes
        if step < 0 or not is_second_evaluation(scheduler):
            step += 1
            schedule = self._forced or self.schedule
            if step == 0:
                num_steps = steps_in_call(scheduler)
            if not repeats_timestep(scheduler):
                step_refreshes = step == 0 or schedule.is_refresh(step, num_steps)
        refresh = step_refreshes or shape_key != self._refreshed_key
        return refresh, step, num_steps, step_refreshes

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
