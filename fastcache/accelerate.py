"""`accelerate(pipe)` and the handle it returns: warm-up, counters, `disable()`, and the step path.

What the handle changes on the pipeline and how it is put back: install.py. diffusers' U-Net call
conventions: unet_call.py. Which runner serves a shape: shapes.py. When to refresh: dispatch.py.
Model changes: model_change.py. What warm-up runs: warmup.py. One call at a time: call_lock.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
from torch import Tensor

from .call_lock import CallLock
from .config import FastCacheConfig
from .controlnet_reuse import ControlNetReuse
from .dispatch import StepDispatcher
from .errors import (
    AlreadyAcceleratedError,
    CompileError,
    HandleDisabledError,
    InvalidConfigError,
    ReentrantCallError,
    UnsupportedInputError,
    UnsupportedPipelineError,
)
from .host_timesteps import timesteps_on_host
from .install import Installation, check_unet, handle_of, pipeline_unet
from .model_change import ModelState
from .runtime import MemoryReport, Runner, autograd_off, describe_key
from .schedule import ExplicitSchedule, UniformSchedule
from .shapes import RunnerFactory, ShapeRunner, make_runner, runtime_name
from .side_models import CompileFailure, SideModels
from .tgate import TgateCalls, check_pipeline
from .unet_call import StepInputs, check_call, check_inputs, unet_output
from .warmup import Shape, WarmupReport, warmup_call_kwargs, warmup_shapes

logger = logging.getLogger("fastcache")


def accelerate(pipe: Any, cache_interval: int = 3, cache_branch_id: int = 0, **options: Any) -> "FastCache":
    """Run `pipe`'s U-Net as DeepCache's full and shallow graphs; `options` are
    `FastCacheConfig`'s fields (docs/options.md).

    Validates everything first: on any error the pipeline is left untouched. Returns the handle
    whose ``disable()`` restores the pipeline exactly.
    """
    config = FastCacheConfig.from_options(cache_interval=cache_interval, cache_branch_id=cache_branch_id, **options)
    return FastCache(pipe, config)


@dataclass
class CallStats:
    """Host-side counters of what the dispatcher decided (no device values)."""

    pipeline_calls: int = 0
    refresh_steps: int = 0
    cached_steps: int = 0
    # One entry per U-Net call of the latest pipeline call: True = refresh (full graph).
    last_call: list[bool] = field(default_factory=list)
    # ... and the batch rows that call ran: half the pipeline's batch after a TGATE gate.
    last_call_rows: list[int] = field(default_factory=list)

    def record(self, refresh: bool, rows: int) -> None:
        self.last_call.append(refresh)
        self.last_call_rows.append(rows)
        self.refresh_steps += refresh
        self.cached_steps += not refresh


class FastCache:
    """The handle `accelerate` returns. Construction validates everything before touching the
    pipeline; any error leaves it as it was.

    `runner_factory` replaces what runs the split (default `shapes.make_runner`): for tools that
    measure fastcache's own overhead or try another runtime.
    """

    accelerates_unet = True  # marks the owner of a patched unet.forward (install.check_unet)

    def __init__(self, pipe: Any, config: FastCacheConfig, runner_factory: RunnerFactory | None = None) -> None:
        config.validate()
        schedule = config.refresh_schedule()
        unet = pipeline_unet(pipe)
        if handle_of(pipe) is not None:
            raise AlreadyAcceleratedError("this pipeline is already accelerated by fastcache; call disable() on its handle first")
        split = check_unet(unet, config)
        if config.gate_step is not None:
            check_pipeline(pipe)
        self.config = config
        self.pipe = pipe
        self.stats = CallStats()
        make = runner_factory or make_runner
        self._dispatcher = StepDispatcher(schedule)
        self._tgate = (
            TgateCalls(config.gate_step, config.cache_interval, config.sp_interval, config.fi_interval, config.warm_up)
            if config.gate_step is not None else None
        )
        self._shapes = ShapeRunner(make(split, config, unet.device), split, self._disable_now)
        self._calling_pipe: Any | None = None  # the pipeline whose call is under way
        self._exclusive = CallLock()  # one pipeline call, warm-up or disable() at a time
        self._last_thread: int | None = None  # made the latest U-Net call or re-armed for one
        # True once reset() was called: U-Net calls outside a pipeline call then trust reset() to
        # check the model before each loop, and the warning is not given (see reset()).
        self._loop_managed = False
        self._warned_outside_call = False
        # Options validate (InvalidConfigError) here, before anything is changed.
        self._controlnet_reuse = ControlNetReuse(pipe, self._dispatcher) if config.controlnet_reuse else None
        self._side_models = (
            SideModels(pipe, config.compile_vae, config.compile_text_encoders, config.compile_kwargs(unet.device.type))
            if config.compile_vae or config.compile_text_encoders else None
        )
        parts = [part for part in (self._controlnet_reuse, self._side_models) if part is not None]
        self._install = Installation(pipe, unet, self, self._unet_forward, parts)
        self._model = ModelState(self._install, self._shapes, config, make, self._dispatcher, unet.device)
        self.enabled = False
        self._install.install()
        self.enabled = True

    def __repr__(self) -> str:
        shapes = sorted(describe_key(key) for key in self._shapes.seen)
        return (
            f"FastCache({' + '.join(self.pipeline_names())}, cache_interval={self.config.cache_interval}, "
            f"cache_branch_id={self.config.cache_branch_id}, runtime={self.runtime!r}, "
            f"shapes={shapes}, enabled={self.enabled})"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> "FastCache":
        # Reached through the U-Net's patched forward when an accelerated model is deep-copied.
        raise UnsupportedPipelineError(
            "an accelerated pipeline or U-Net cannot be deep-copied (its forward belongs to the "
            "fastcache handle and its graphs): copy it before fastcache.accelerate or after disable()"
        )

    # -- state -----------------------------------------------------------------------------------
    @property
    def unet(self) -> Any:
        return self._install.unet

    @property
    def split(self) -> Any:
        return self._shapes.split

    @property
    def _runner(self) -> Runner:
        return self._shapes.runner

    @property
    def compilations(self) -> int:
        """Graphs compiled by this handle so far (one per function and shape, counted again when
        a model change made them be prepared anew)."""
        return self._shapes.compilations

    @property
    def eager_shapes(self) -> tuple[str, ...]:
        """Shapes served by the eager split because this handle's graphs are full
        (`runtime.RECOMPILE_LIMIT` graphs per U-Net function; see shapes.py)."""
        return self._shapes.eager_shapes

    @property
    def runtime(self) -> str:
        """What runs the U-Net: "eager", "compiled", "cuda-graphs" or "emulated-graphs"."""
        return runtime_name(self._runner)

    def memory(self) -> MemoryReport:
        """Device memory fastcache holds between calls beyond the pipeline's own (bytes): static
        input and output buffers, kept features, and on CUDA the graphs' shared memory pool."""
        return self._shapes.memory()

    def pipeline_names(self) -> list[str]:
        return [self._install.original_class.__name__] + [original.__name__ for _, original in self._install.attached]

    # -- public ----------------------------------------------------------------------------------
    def warmup(
        self,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        *,
        shapes: Sequence[Shape] | None = None,
        **call_kwargs: Any,
    ) -> WarmupReport:
        """Compile (and on CUDA capture) both graphs for one resolution and batch size, or for
        every ``(height, width, batch_size)`` in `shapes`, largest first (their graphs share one
        memory pool, which the largest sizes: as sglang's runner captures).

        Runs the pipeline once per shape with an empty prompt, `num_inference_steps` steps (default
        3), latent output, a fixed generator, and the schedule forced to refresh at step 0 only, so
        the full and the shallow graph both run. With `gate_step` (TGATE) the call runs TGATE's own
        plan instead, which prepares every graph a call of that many steps uses (default
        ``gate_step + 2 * cache_interval``: all of them with the default self-attention options);
        pass the serving calls' `num_inference_steps` when they use other self-attention options.
        Pass any other call argument (``guidance_scale``, ``image`` and ``strength`` for
        img2img...) as the serving calls will: the shapes must match theirs
        (classifier-free guidance on or off is part of the shape: it doubles the U-Net's batch).
        """
        if num_inference_steps is None:
            gate = self.config.gate_step
            num_inference_steps = 3 if gate is None else gate + 2 * self.config.cache_interval
        ordered = warmup_shapes(height, width, batch_size, shapes)
        with self._exclusive():  # no other thread's call may run with the warm-up's schedule
            self._require_enabled()
            start, before, known = time.perf_counter(), self.compilations, set(self._shapes.seen)
            for shape in ordered:
                self._warmup_one(warmup_call_kwargs(shape, num_inference_steps, self.config.compile_vae, call_kwargs))
        new = tuple(describe_key(key) for key in self._shapes.seen - known)
        return WarmupReport(time.perf_counter() - start, new, self.compilations - before)

    def attach(self, pipe: Any) -> None:
        """Accelerate another pipeline that shares this one's U-Net (``from_pipe``, or built from
        ``**pipe.components``: an img2img or inpaint pipeline beside a text-to-image one).

        Both pipelines then use the same graphs, settings and counters; each call re-arms at its
        start and follows the calling pipeline's scheduler. `disable()` restores both.
        """
        self._require_enabled()
        with self._exclusive():
            if self._controlnet_reuse is not None:
                raise InvalidConfigError(
                    "attach() does not support controlnet_reuse (it follows one pipeline's ControlNet); "
                    "accelerate without controlnet_reuse to share the U-Net between pipelines"
                )
            if self._tgate is not None:
                check_pipeline(pipe)
            self._install.attach(pipe)  # checks that `pipe` shares the U-Net and is not accelerated

    def reset(self) -> None:
        """Start a custom denoising loop that calls ``pipe.unet`` directly: the next U-Net call
        refreshes, and the model is checked in full for changes (LoRA loaded, fused, switched...;
        also changes made where fastcache does not watch, model_watch.py; a replaced ``pipe.unet``
        is accelerated in place of the previous one), as a pipeline call does at its start.
        """
        self._require_enabled()
        with self._exclusive():  # never in the middle of another thread's pipeline call
            self._require_enabled()  # disabled by another thread meanwhile
            if getattr(self.pipe, "unet", None) is not self.unet:
                self._model.adopt(self.pipe)
            self._model.check(full=True)
            self._dispatcher.rearm()
            self._last_thread = threading.get_ident()
            self._loop_managed = True

    def disable(self) -> None:
        """Restore the pipeline exactly as it was and free graphs and cached features.

        From another thread, waits for a pipeline call under way to finish (its graphs are in
        use); from inside a call (fastcache's own error handling, a step callback) it acts at once.
        """
        with self._exclusive():
            self._disable_now()

    def note_model_change(self) -> None:
        """A pipeline method that changes the U-Net ran (install.PIPELINE_WATCHED_METHODS): the
        next call takes the full fingerprint."""
        if self._install.watch is not None:
            self._install.watch.note()

    def pipeline_call(self, pipe: Any, call: Callable[[], Any]) -> Any:
        """Run one call of an accelerated pipeline (its class's ``__call__``, install.py)."""
        if self._calling_pipe is not None and self._exclusive.held_here():
            raise ReentrantCallError(
                "the accelerated pipeline was called from inside one of its own calls (a step callback?); "
                "fastcache runs one call at a time per pipeline. Make that call after the outer one "
                "returns, or on another pipeline."
            )
        with self._exclusive():
            self._begin_pipeline_call(pipe)
            self._calling_pipe = pipe
            try:
                with timesteps_on_host(pipe.scheduler) if self.config.host_timesteps else contextlib.nullcontext():
                    return call()
            except CompileFailure as failure:
                self._disable_now()
                raise CompileError(
                    f"fastcache failed {failure.where}: {failure.__cause__!r}\nThe pipeline was restored "
                    "to its original state; accelerate without compile_vae / compile_text_encoders to "
                    "leave that model eager."
                ) from failure.__cause__
            finally:
                self._calling_pipe = None

    # -- internals -------------------------------------------------------------------------------
    def _warmup_one(self, kwargs: Mapping[str, Any]) -> None:
        """One pipeline call with the schedule forced to refresh at step 0 only (both graphs run)."""
        caching = self._dispatcher.schedule.caches
        if self._tgate is None:  # TGATE runs its own plan: its graphs are those of a serving call
            self._dispatcher.force(ExplicitSchedule(frozenset({0})) if caching else UniformSchedule(1))
        self._runner.allow_new_shapes = self._shapes.warming = True
        try:
            self.pipe(**kwargs)
            if self._model.device.type == "cuda":
                torch.cuda.synchronize(self._model.device)
        finally:
            self._shapes.warming = False
            self._dispatcher.force(None)
            if self.enabled:
                self._runner.allow_new_shapes = not self.config.strict
        if caching and self._tgate is None and all(self.stats.last_call):
            logger.warning(
                "warm-up ran no cached step, so the shallow graph is not prepared; give warmup() "
                "enough steps (num_inference_steps, img2img strength) for at least two to run"
            )

    def _disable_now(self) -> None:
        if not self.enabled:
            return
        self._install.uninstall()
        self._shapes.release()
        self.enabled = False

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise HandleDisabledError(
                "this fastcache handle is disabled (disable() was called, or it restored the pipeline "
                "after a compile failure); call fastcache.accelerate(pipe) for a new one"
            )

    def _begin_pipeline_call(self, pipe: Any) -> None:
        if getattr(pipe, "unet", None) is not self.unet:
            self._model.adopt(pipe)
        if getattr(self.unet, "_hf_hook", None) is not None:
            raise UnsupportedInputError(
                "the U-Net got accelerate hooks (enable_model_cpu_offload / device_map) after "
                "fastcache.accelerate; fastcache does not support model offload yet. Call disable() on "
                "the fastcache handle before enabling offload."
            )
        self._model.check()
        self._dispatcher.rearm()
        if self._tgate is not None:
            self._tgate.rearm()
        self._last_thread = threading.get_ident()
        self.stats.pipeline_calls += 1
        self.stats.last_call = []
        self.stats.last_call_rows = []

    def _arm_direct_call(self) -> None:
        """A U-Net call outside a pipeline call (a custom loop, another pipeline sharing the U-Net)."""
        if self._last_thread != threading.get_ident():
            # After another thread's pipeline call or loop: their step counter and kept features are
            # not this caller's, so it starts afresh (a refresh) rather than continue them.
            self._dispatcher.rearm()
        if not self._loop_managed:
            self._model.check(full=True)  # until the loop uses reset(), every call checks everything
            if not self._warned_outside_call:
                self._warned_outside_call = True
                logger.warning(
                    "pipe.unet was called outside the accelerated pipeline's __call__: fastcache "
                    "re-arms only at the start of its pipelines' calls. Another pipeline sharing this "
                    "U-Net: accelerate it too with handle.attach(other_pipe). A custom loop: call "
                    "reset() on the handle before each denoising loop"
                )

    def _unet_forward(
        self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor,
        class_labels: Tensor | None = None, timestep_cond: Tensor | None = None,
        attention_mask: Tensor | None = None, cross_attention_kwargs: Mapping[str, Any] | None = None,
        added_cond_kwargs: Mapping[str, Tensor] | None = None,
        down_block_additional_residuals: tuple[Tensor, ...] | None = None,
        mid_block_additional_residual: Tensor | None = None,
        down_intrablock_additional_residuals: tuple[Tensor, ...] | None = None,
        encoder_attention_mask: Tensor | None = None, return_dict: bool = True,
    ) -> Any:
        """Replaces ``pipe.unet.forward``; same signature and return type as diffusers'."""
        if not self._exclusive.held_here():
            # Not inside this thread's pipeline call: hold the handle's lock for this one U-Net call,
            # so that it waits for another thread's pipeline call instead of running in its middle.
            arguments = {name: value for name, value in locals().items() if name != "self"}
            with self._exclusive():
                return self._unet_forward(**arguments)
        check_call(sample, encoder_hidden_states, class_labels, attention_mask, cross_attention_kwargs,
                   added_cond_kwargs, down_block_additional_residuals, mid_block_additional_residual,
                   down_intrablock_additional_residuals, encoder_attention_mask)
        check_inputs(self.unet, sample, encoder_hidden_states)
        if sample.device != self._model.device:
            self._model.check(full=True)  # a moved U-Net: new storage, so new graphs
        if self._calling_pipe is None:
            self._arm_direct_call()
        self._last_thread = threading.get_ident()
        with autograd_off():  # the same state in and out of the caller's torch.inference_mode
            inputs = StepInputs.from_unet_call(
                sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                down_block_additional_residuals, mid_block_additional_residual,
                (cross_attention_kwargs or {}).get("ip_adapter_masks"),
            )
            pipe = self._calling_pipe if self._calling_pipe is not None else self.pipe
            scheduler = pipe.scheduler
            tgate = self._tgate_step(pipe, scheduler, timestep, inputs)
            if tgate is not None and not tgate.guided:
                inputs = inputs.unconditional_half()  # after the gate: the unconditional half only
            key = inputs.key()
            self._dispatcher.locate(scheduler, timestep)  # PNDM img2img: DeepCache's step numbers
            refresh = self._dispatcher.next_call(scheduler, key)
            if tgate is not None and refresh != tgate.refresh:
                raise RuntimeError(f"fastcache TGATE: the dispatcher and the plan disagree at step {self._dispatcher.step}")
            if self._controlnet_reuse is not None:  # stores (or, as a safety net, recomputes) its residuals
                inputs = self._controlnet_reuse.unet_call(refresh, key, inputs)
            with self._model.lora.applied((cross_attention_kwargs or {}).get("scale", 1.0)):  # a number or a tensor
                actions = None if tgate is None or (tgate.plain and tgate.guided and self._plain_graphs()) else tgate.actions
                noise = self._run(refresh, key, inputs, actions)
            if tgate is not None and not tgate.guided:
                # Both halves the same noise: the pipeline's guidance u + s * (c - u) gives it back.
                noise = torch.cat([noise, noise])
        self.stats.record(refresh, int(inputs.sample.shape[0]))
        return unet_output(noise, return_dict)

    def _tgate_step(self, pipe: Any, scheduler: Any, timestep: Any, inputs: StepInputs) -> Any:
        """TGATE's step for this U-Net call (None without gate_step)."""
        if self._tgate is None:
            return None
        if self._calling_pipe is None:
            raise UnsupportedInputError(
                "gate_step (TGATE): pipe.unet was called outside the accelerated pipeline's call; TGATE "
                "plans each pipeline call, so it runs through the pipeline only"
            )
        extra = sorted(set(inputs.added) - {"text_embeds", "time_ids"})
        if extra:
            raise UnsupportedInputError(
                f"gate_step (TGATE) runs text-to-image U-Net calls only; this one passes {extra} "
                "(IP-Adapter, ControlNet, LCM's guidance embedding): accelerate without gate_step"
            )
        return self._tgate.next_step(pipe, scheduler, self._dispatcher, timestep)

    def _plain_graphs(self) -> bool:
        """Whether a TGATE step that stores and reuses nothing may run the plain full and shallow
        graphs: not with graphs, whose shallow graphs read only the kept buffer of their own full
        graph (TGATE's graphs share one per shape)."""
        return self.runtime in ("eager", "compiled")

    def _run(self, refresh: bool, key: Hashable, inputs: StepInputs, actions: tuple[str, str, str] | None = None) -> Tensor:
        try:
            return self._shapes.run(refresh, key, inputs, actions)
        except BaseException:
            self._dispatcher.rearm()  # the next call refreshes: nothing half-done is reused
            raise
