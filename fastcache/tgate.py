"""TGATE (arXiv 2404.02747) on top of DeepCache: the static per-call plan.

The semantics are those of the ``tgate`` 1.0.0 package's DeepCache loaders
(``TgateSDDeepCacheLoader``, ``TgateSDXLDeepCacheLoader``), read from its code:

* its loop numbers U-Net calls ``c = i - num_warmup_steps`` (``num_warmup_steps = len(timesteps)
  - num_inference_steps * order``: 1 for PNDM in PLMS mode, 0 for DDIM, Euler...; SDXL clamps it
  at 0). Calls with ``c < gate_step`` run the guided batch; from ``c == gate_step`` on, the U-Net
  runs the unconditional half alone (latents with the negative embeddings, and for SDXL the
  negative pooled embeddings and time ids) and its output is the noise, without guidance (nor
  guidance rescale);
* ``tgate_scheduler(c)`` sets each attention module's flags: before ``gate_step - 1`` self-attention
  outputs are cached at ``c == warm_up`` and every ``sp_interval`` steps and reused on the other
  steps after ``warm_up``; at ``gate_step - 1`` every cross- and self-attention output is cached as
  the mean of its two guided halves; after it, cross-attention outputs are reused from that cache,
  and self-attention is cached every ``fi_interval`` steps and reused in between. A module reuses
  only if it holds a cache: each module keeps its own, written only when it runs with the cache
  flag (on a DeepCache cached step the deep modules do not run). The flags are set only for calls
  with ``i >= num_warmup_steps`` (or the last); before, none is set;
* DeepCache's helper is re-armed (``disable(); enable()``) at ``c == gate_step - 1`` and at
  ``c == gate_step``: both calls refresh and DeepCache's step count restarts at each.

The package keeps each module's cache across pipeline calls (stale state: a second call can
reuse the first call's outputs); fastcache plans every call as the package's first call on a
fresh pipeline. Everything here is a host-side function of the step counts, known at the call's
first U-Net call: no device value is read.

A module's action on one U-Net call is one of ``compute``, ``store`` (compute, keep the output),
``store_mean`` (compute, keep the mean of the guided halves), ``reuse`` (the kept output instead
of computing). Stores that no later step reads are planned as ``compute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

COMPUTE, STORE, STORE_MEAN, REUSE = "compute", "store", "store_mean", "reuse"
SHALLOW, DEEP = "shallow", "deep"


@dataclass(frozen=True)
class TgateStep:
    """What one U-Net call of a TGATE pipeline call runs."""

    refresh: bool  # the full U-Net (DeepCache refresh) or the shallow branch
    guided: bool  # the whole classifier-free-guidance batch, or its unconditional half only
    ca: str  # cross-attention action (the same for every module that runs)
    sa_shallow: str  # self-attention action of the modules in the shallow branch
    sa_deep: str  # ... and of the deep ones (which run on refresh steps only)

    @property
    def actions(self) -> tuple[str, str, str]:
        """The static part a graph specialises on: (ca, sa shallow, sa deep)."""
        return (self.ca, self.sa_shallow, self.sa_deep if self.refresh else COMPUTE)

    @property
    def plain(self) -> bool:
        """Nothing stored or reused: the plain full or shallow function gives the same result."""
        return self.actions == (COMPUTE, COMPUTE, COMPUTE)


def package_flags(cur_step: int, gate_step: int, sp_interval: int, fi_interval: int, warm_up: int
                  ) -> tuple[bool, bool, bool, bool, bool]:
    """The package's ``tgate_scheduler``: (ca cache, ca reuse, sa cache, sa reuse, keep_shape)."""
    if cur_step < gate_step - 1:
        if cur_step < warm_up:
            return False, False, False, False, True
        if cur_step == warm_up or cur_step % sp_interval == 0:
            return False, False, True, False, True
        return False, False, False, True, True
    if cur_step == gate_step - 1:
        return True, False, True, False, False
    if cur_step % fi_interval == 0:
        return False, True, True, False, True
    return False, True, False, True, True


def warmup_offset(num_timesteps: int, num_inference_steps: int, order: int, clamp: bool) -> int:
    """The package's ``num_warmup_steps`` (SDXL's loop clamps it at 0, SD's does not)."""
    offset = num_timesteps - num_inference_steps * order
    return max(offset, 0) if clamp else offset


def plan_call(
    num_calls: int,
    numbers: Sequence[int] | None,
    offset: int,
    cache_interval: int,
    gate_step: int,
    sp_interval: int = 1,
    fi_interval: int = 1,
    warm_up: int = 0,
) -> list[TgateStep]:
    """The plan of a guided pipeline call with `num_calls` U-Net calls (first-order scheduler).

    `numbers`: DeepCache's step number of each call (dispatch.deepcache_numbers; None: the call
    index); `offset`: `warmup_offset`.
    """
    number = (lambda i: numbers[i] if numbers is not None and i < len(numbers) else i)
    base = 0
    # Per (kind, group): the step whose store the module holds, or None; per store: read or not.
    holds: dict[tuple[str, str], int | None] = {}
    read: set[tuple[int, str, str]] = set()
    raw: list[tuple[bool, bool, dict[tuple[str, str], str]]] = []
    for i in range(num_calls):
        c = i - offset
        if i == 0 or c in (gate_step - 1, gate_step):
            base = number(i)
        refresh = (number(i) - base) % cache_interval == 0
        guided = c < gate_step
        flags = (package_flags(c, gate_step, sp_interval, fi_interval, warm_up)
                 if i >= offset or i == num_calls - 1 else (False, False, False, False, True))
        ca_cache, ca_reuse, sa_cache, sa_reuse, keep_shape = flags
        actions: dict[tuple[str, str], str] = {}
        for group in (SHALLOW, DEEP) if refresh else (SHALLOW,):
            for kind, cache, reuse in (("ca", ca_cache, ca_reuse), ("sa", sa_cache, sa_reuse)):
                held = holds.get((kind, group))
                if reuse and held is not None:
                    # The kept output has the batch of the step that stored it: guided (whole)
                    # before the gate, the unconditional half from gate_step - 1 (the mean) on.
                    stored_guided = raw[held][1] and raw[held][2][(kind, group)] == STORE
                    assert stored_guided == guided, "TGATE plan: a reuse across the gate"
                    actions[(kind, group)] = REUSE
                    read.add((held, kind, group))
                elif cache:
                    actions[(kind, group)] = STORE if keep_shape else STORE_MEAN
                    holds[(kind, group)] = i
                else:
                    actions[(kind, group)] = COMPUTE
        raw.append((refresh, guided, actions))
    plan = []
    for i, (refresh, guided, actions) in enumerate(raw):
        live = {
            key: (action if action not in (STORE, STORE_MEAN) or (i, *key) in read else COMPUTE)
            for key, action in actions.items()
        }
        ca = {live[("ca", group)] for group in (SHALLOW, DEEP) if ("ca", group) in live}
        assert len(ca) == 1, "TGATE plan: cross-attention differs between branches"
        plan.append(TgateStep(refresh, guided, ca.pop(), live[("sa", SHALLOW)], live.get(("sa", DEEP), COMPUTE)))
    return plan


def supported_pipeline(pipe: object) -> bool:
    """The pipelines TGATE runs on: SD 1.x/2.x and SDXL text-to-image (the package's loaders)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline))


def check_pipeline(pipe: object) -> None:
    from .errors import UnsupportedPipelineError

    if not supported_pipeline(pipe):
        raise UnsupportedPipelineError(
            f"gate_step (TGATE) supports StableDiffusionPipeline and StableDiffusionXLPipeline "
            f"(text-to-image), as the tgate package's DeepCache loaders do; this is {type(pipe).__name__}. "
            "Accelerate it without gate_step."
        )


class TgateCalls:
    """The handle's TGATE state: the plan of the pipeline call under way and its next step."""

    def __init__(self, gate_step: int, cache_interval: int, sp_interval: int, fi_interval: int, warm_up: int) -> None:
        self.gate_step, self.cache_interval = gate_step, cache_interval
        self.sp_interval, self.fi_interval, self.warm_up = sp_interval, fi_interval, warm_up
        self.rearm()

    def rearm(self) -> None:
        """A new pipeline call: its plan is made at its first U-Net call."""
        self.plan: list[TgateStep] | None = None
        self.index = 0

    def next_step(self, pipe: object, scheduler: object, dispatcher: object, timestep: object) -> TgateStep:
        """The step of the coming U-Net call; at a call's first, its plan (and the dispatcher's
        re-arm steps). Raises UnsupportedInputError for calls TGATE does not define."""
        from .dispatch import deepcache_numbers, timestep_position
        from .errors import UnsupportedInputError

        if self.plan is None:
            order = int(getattr(scheduler, "order", 1))
            if order != 1:
                raise UnsupportedInputError(
                    f"gate_step (TGATE) supports first-order schedulers only; {type(scheduler).__name__} has "
                    f"order {order} (the tgate package counts its gate in U-Net evaluations there). Use DDIM, "
                    "PNDM, Euler, DPM-Solver multistep..., or accelerate without gate_step."
                )
            if not getattr(pipe, "do_classifier_free_guidance", False):
                raise UnsupportedInputError(
                    "gate_step (TGATE) needs classifier-free guidance (guidance_scale > 1): at the gate it "
                    "caches the mean of the guided halves of each cross-attention output (the tgate package "
                    "fails there without guidance: it cannot split a batch of 1 in two)"
                )
            timesteps = getattr(scheduler, "timesteps")
            num_calls = len(timesteps)
            from diffusers import StableDiffusionXLPipeline

            offset = warmup_offset(num_calls, int(getattr(scheduler, "num_inference_steps")), order,
                                   clamp=isinstance(pipe, StableDiffusionXLPipeline))
            numbers = deepcache_numbers(scheduler, timestep_position(scheduler, timestep))
            self.plan = plan_call(num_calls, numbers, offset, self.cache_interval, self.gate_step,
                                  self.sp_interval, self.fi_interval, self.warm_up)
            dispatcher.rearm_at(frozenset(  # type: ignore[attr-defined]
                i for i in range(num_calls) if i - offset in (self.gate_step - 1, self.gate_step)))
        if self.index >= len(self.plan):
            raise UnsupportedInputError(
                "gate_step (TGATE): this pipeline call made more U-Net calls than its scheduler has timesteps"
            )
        step = self.plan[self.index]
        self.index += 1
        return step
