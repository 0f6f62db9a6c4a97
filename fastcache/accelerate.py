"""`accelerate(pipe)` and the handle it returns: warm-up, counters, `disable()`, and the step path.

What the handle changes on the pipeline and how it is put back: install.py. diffusers' U-Net call
conventions: unet_call.py. Which runner serves a shape: shapes.py. When to refresh: dispatch.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .config import FastCacheConfig
from .controlnet_reuse import ControlNetReuse
from .dispatch import StepDispatcher
from .errors import (
    AlreadyAcceleratedError,
    CompileError,
    FastCacheError,
    HandleDisabledError,
    InvalidConfigError,
    ReentrantCallError,
    UnsupportedInputError,
    UnsupportedPipelineError,
)
from .graphs import GraphRunner
from .host_timesteps import timesteps_on_host
from .install import Installation, check_hooks, check_unet, handle_of, pipeline_unet
from .lora import LoraScales, model_fingerprint
from .runtime import CompiledRunner, MemoryReport, Runner, autograd_off, describe_key
from .schedule import ExplicitSchedule, UniformSchedule
from .shapes import RunnerFactory, ShapeRunner, make_runner
from .side_models import CompileFailure, SideModels
from .unet_call import StepInputs, check_call, check_inputs, unet_output

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


@dataclass(frozen=True)
class WarmupReport:
    """What one warmup() call prepared and how long it took."""

    seconds: float
    new_shapes: tuple[str, ...]
    compilations: int


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
        self.config = config
        self.pipe = pipe
        self.stats = CallStats()
        self._make_runner = runner_factory or make_runner
        self._device = unet.device
        self._dispatcher = StepDispatcher(schedule)
        self._shapes = ShapeRunner(self._make_runner(split, config, self._device), split, self._disable_now)
        self._lora = LoraScales(unet, self._device)
        self._fingerprint = model_fingerprint(unet)
        self._calling_pipe: Any | None = None  # the pipeline whose call is under way
        # One pipeline call at a time (see _exclusive); the thread holding it, and the thread that
        # made the latest U-Net call or re-armed for one (see _arm_direct_call).
        self._call_lock = threading.Lock()
        self._call_thread: int | None = None
        self._last_thread: int | None = None
        # True once reset() was called: U-Net calls outside a pipeline call then trust reset() to
        # check the model before each loop, and the warning is not given (see reset()).
        self._loop_managed = False
        self._warned_outside_call = False
        # Options validate (InvalidConfigError) here, before anything is changed.
        self._controlnet_reuse = ControlNetReuse(pipe, self._dispatcher) if config.controlnet_reuse else None
        self._side_models = (
            SideModels(pipe, config.compile_vae, config.compile_text_encoders, config.compile_kwargs())
            if config.compile_vae or config.compile_text_encoders else None
        )
        parts = [part for part in (self._controlnet_reuse, self._side_models) if part is not None]
        self._install = Installation(pipe, unet, self, self._unet_forward, parts)
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
        (`runtime.RECOMPILE_LIMIT` shapes per U-Net function; see shapes.py)."""
        return self._shapes.eager_shapes

    @property
    def runtime(self) -> str:
        """What runs the U-Net: "eager", "compiled", "cuda-graphs" or "emulated-graphs"."""
        runner = self._runner
        if isinstance(runner, GraphRunner):
            return "emulated-graphs" if runner.emulate else "cuda-graphs"
        return "compiled" if isinstance(runner, CompiledRunner) else "eager"

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
        num_inference_steps: int = 3,
        *,
        shapes: Sequence[tuple[int, int, int]] | None = None,
        **call_kwargs: Any,
    ) -> WarmupReport:
        """Compile (and on CUDA capture) both graphs for one resolution and batch size, or for
        every ``(height, width, batch_size)`` in `shapes`, largest first (their graphs share one
        memory pool, which the largest sizes: as sglang's runner captures).

        Runs the pipeline once per shape with an empty prompt, `num_inference_steps` steps, latent
        output, a fixed generator, and the schedule forced to refresh at step 0 only, so the full
        and the shallow graph both run. Pass any other call argument (``guidance_scale``, ``image``
        and ``strength`` for img2img...) as the serving calls will: the shapes must match theirs
        (classifier-free guidance on or off is part of the shape: it doubles the U-Net's batch).
        """
        if shapes is None:
            shapes = [(height, width, batch_size)]  # type: ignore[list-item]
        elif height is not None or width is not None or batch_size != 1:
            raise InvalidConfigError("warmup() takes shapes=[(height, width, batch_size), ...] or one height, "
                                     "width and batch_size, not both")
        ordered = sorted(shapes, key=lambda s: -((s[0] or 0) * (s[1] or 0) * s[2]))
        with self._exclusive():  # no other thread's call may run with the warm-up's schedule
            self._require_enabled()
            start, before, known = time.perf_counter(), self.compilations, set(self._shapes.seen)
            for shape_height, shape_width, shape_batch in ordered:
                self._warmup_one(shape_height, shape_width, shape_batch, num_inference_steps, call_kwargs)
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
            if getattr(pipe, "unet", None) is not self.unet:
                raise UnsupportedPipelineError(
                    f"attach() needs a pipeline that shares this handle's U-Net (pipe.unet is the same "
                    f"object); {type(pipe).__name__}'s U-Net is another one: accelerate it on its own"
                )
            if pipe is self.pipe or handle_of(pipe) is not None:
                raise AlreadyAcceleratedError(f"this {type(pipe).__name__} is already accelerated by fastcache")
            if self._controlnet_reuse is not None:
                raise InvalidConfigError(
                    "attach() does not support controlnet_reuse (it follows one pipeline's ControlNet); "
                    "accelerate without controlnet_reuse to share the U-Net between pipelines"
                )
            if not hasattr(pipe, "scheduler"):
                raise UnsupportedPipelineError(f"{type(pipe).__name__} has no scheduler")
            self._install.attach(pipe)

    def reset(self) -> None:
        """Start a custom denoising loop that calls ``pipe.unet`` directly: the next U-Net call
        refreshes, and the model is checked in full for changes (LoRA loaded, fused, switched...;
        also changes made where fastcache does not watch, model_watch.py; a replaced ``pipe.unet``
        is accelerated in place of the previous one), as a pipeline call does at its start.
        """
        with self._exclusive():  # never in the middle of another thread's pipeline call
            if self.enabled and getattr(self.pipe, "unet", None) is not self.unet:
                self._adopt_unet(self.pipe)
            if self.enabled:
                self._check_model(full=True)
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
        if self._calling_pipe is not None and self._call_thread == threading.get_ident():
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
    def _warmup_one(self, height: int | None, width: int | None, batch_size: int, num_inference_steps: int,
                    call_kwargs: Mapping[str, Any]) -> None:
        kwargs: dict[str, Any] = dict(
            num_images_per_prompt=batch_size, num_inference_steps=num_inference_steps, output_type="latent",
            generator=torch.Generator("cpu").manual_seed(0),
        )
        kwargs.update({name: value for name, value in (("height", height), ("width", width)) if value is not None})
        if self.config.compile_vae:
            kwargs["output_type"] = "np"  # runs the VAE decoder, so its graph is prepared too
        kwargs.update(call_kwargs)
        if "prompt_embeds" not in kwargs:
            kwargs.setdefault("prompt", "")
        caching = self._dispatcher.schedule.caches
        self._dispatcher.force(ExplicitSchedule(frozenset({0})) if caching else UniformSchedule(1))
        self._runner.allow_new_shapes = self._shapes.warming = True
        try:
            self.pipe(**kwargs)
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
        finally:
            self._shapes.warming = False
            self._dispatcher.force(None)
            if self.enabled:
                self._runner.allow_new_shapes = not self.config.strict
        if caching and all(self.stats.last_call):
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

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One pipeline call, warm-up or disable() at a time; other threads wait their turn.

        A call's graphs, static buffers, kept features and step counter are shared by every call
        of this handle, so overlapping calls (a threaded web server's workers) would silently mix
        their steps. The thread that holds the lock passes (warmup's own pipeline call, disable()
        from fastcache's error handling inside a call).
        """
        if self._call_thread == threading.get_ident():
            yield
            return
        with self._call_lock:
            self._call_thread = threading.get_ident()
            try:
                yield
            finally:
                self._call_thread = None

    def _begin_pipeline_call(self, pipe: Any) -> None:
        if getattr(pipe, "unet", None) is not self.unet:
            self._adopt_unet(pipe)
        if getattr(self.unet, "_hf_hook", None) is not None:
            raise UnsupportedInputError(
                "the U-Net got accelerate hooks (enable_model_cpu_offload / device_map) after "
                "fastcache.accelerate; fastcache does not support model offload yet. Call disable() on "
                "the fastcache handle before enabling offload."
            )
        self._check_model()
        self._dispatcher.rearm()
        self._last_thread = threading.get_ident()
        self.stats.pipeline_calls += 1
        self.stats.last_call = []

    def _adopt_unet(self, pipe: Any) -> None:
        """`pipe.unet` was replaced (a fine-tune, another sample size): accelerate the new U-Net in
        place of the old one, as a model change, with the images of accelerating it afresh.
        Raises, changing nothing, when it cannot be accelerated or other pipelines of this handle
        still use the old one."""
        new = getattr(pipe, "unet", None)
        stale = [type(other).__name__ for other in self._install.pipelines() if getattr(other, "unet", None) is not new]
        if stale:
            raise UnsupportedPipelineError(
                f"this {type(pipe).__name__}'s unet was replaced, but the pipelines sharing this handle "
                f"({', '.join(stale)}) still use the previous one: one handle accelerates one U-Net. Set the "
                "new U-Net on every attached pipeline, or put the previous one back"
            )
        try:
            split = check_unet(new, self.config)
        except FastCacheError as error:
            raise type(error)(
                f"this {type(pipe).__name__}'s unet was replaced after fastcache.accelerate, and the new one "
                f"cannot be accelerated: {error}. Put the previous U-Net back, or call disable() on the "
                "handle to run the new one without fastcache"
            ) from error
        logger.info("pipe.unet was replaced: fastcache accelerates the new U-Net and prepares its graphs again")
        self._install.replace_unet(new)
        self._rebuild(new.device, split)

    def _check_model(self, full: bool = False) -> None:
        """Prepare graphs again if the U-Net changed since they were built: LoRA adapters loaded,
        fused, switched or deleted, processors, FreeU, chunking, or weights given new storage.
        The full fingerprint (lora.py) is taken only when the watch saw a change (model_watch.py),
        or when `full` (reset())."""
        watch = self._install.watch
        assert watch is not None
        if not full and not watch.changed():
            return
        fingerprint = model_fingerprint(self.unet)
        watch.accept()
        if fingerprint == self._fingerprint:
            return
        check_hooks(self.unet, self.config)  # hooks change weights, so the fingerprint: checked here
        if self.unet.device != self._device:  # pipe.to(another device): new storage, new device
            logger.warning("the U-Net moved from %s to %s: fastcache prepares its graphs again there",
                           self._device, self.unet.device)
        else:
            logger.info("the U-Net's modules, adapters or weight storage changed since fastcache built its "
                        "graphs (load_lora_weights, fuse_lora, set_adapters with other adapters, ...): "
                        "preparing them again")
        self._rebuild(self.unet.device, self.split)

    def _rebuild(self, device: torch.device, split: Any) -> None:
        """A new runner (graphs compiled and captured again on first use) and LoRA scale buffer."""
        self._shapes.replace(self._make_runner(split, self.config, device), split)
        self._device = device
        self._lora = LoraScales(self.unet, device)
        self._fingerprint = model_fingerprint(self.unet)
        self._dispatcher.rearm()

    def _arm_direct_call(self) -> None:
        """A U-Net call outside a pipeline call (a custom loop, another pipeline sharing the U-Net)."""
        if self._last_thread != threading.get_ident():
            # After another thread's pipeline call or loop: their step counter and kept features are
            # not this caller's, so it starts afresh (a refresh) rather than continue them.
            self._dispatcher.rearm()
        if not self._loop_managed:
            self._check_model(full=True)  # until the loop uses reset(), every call checks everything
            if not self._warned_outside_call:
                self._warned_outside_call = True
                logger.warning(
                    "pipe.unet was called outside the accelerated pipeline's __call__: fastcache "
                    "re-arms only at the start of its pipelines' calls. Another pipeline sharing this "
                    "U-Net: accelerate it too with handle.attach(other_pipe). A custom loop: call "
                    "reset() on the handle before each denoising loop"
                )

    def _unet_forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        class_labels: Tensor | None = None,
        timestep_cond: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
        added_cond_kwargs: Mapping[str, Tensor] | None = None,
        down_block_additional_residuals: tuple[Tensor, ...] | None = None,
        mid_block_additional_residual: Tensor | None = None,
        down_intrablock_additional_residuals: tuple[Tensor, ...] | None = None,
        encoder_attention_mask: Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        """Replaces ``pipe.unet.forward``; same signature and return type as diffusers'."""
        if self._call_thread != threading.get_ident():
            # Not inside this thread's pipeline call: hold the handle's lock for this one U-Net call,
            # so that it waits for another thread's pipeline call instead of running in its middle.
            arguments = {name: value for name, value in locals().items() if name != "self"}
            with self._exclusive():
                return self._unet_forward(**arguments)
        check_call(sample, encoder_hidden_states, class_labels, attention_mask, cross_attention_kwargs,
                   added_cond_kwargs, down_block_additional_residuals, mid_block_additional_residual,
                   down_intrablock_additional_residuals, encoder_attention_mask)
        check_inputs(self.unet, sample, encoder_hidden_states)
        if sample.device != self._device:
            self._check_model(full=True)  # a moved U-Net: new storage, so new graphs
        if self._calling_pipe is None:
            self._arm_direct_call()
        self._last_thread = threading.get_ident()
        with autograd_off():  # the same state in and out of the caller's torch.inference_mode
            inputs = StepInputs.from_unet_call(
                sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                down_block_additional_residuals, mid_block_additional_residual,
                (cross_attention_kwargs or {}).get("ip_adapter_masks"),
            )
            key = inputs.key()
            scheduler = (self._calling_pipe if self._calling_pipe is not None else self.pipe).scheduler
            self._dispatcher.locate(scheduler, timestep)  # PNDM img2img: DeepCache's step numbers
            refresh = self._dispatcher.next_call(scheduler, key)
            if self._controlnet_reuse is not None:  # stores (or, as a safety net, recomputes) its residuals
                inputs = self._controlnet_reuse.unet_call(refresh, key, inputs)
            with self._lora.applied((cross_attention_kwargs or {}).get("scale", 1.0)):  # a number or a tensor
                noise = self._run(refresh, key, inputs)
        self.stats.last_call.append(refresh)
        if refresh:
            self.stats.refresh_steps += 1
        else:
            self.stats.cached_steps += 1
        return unet_output(noise, return_dict)

    def _run(self, refresh: bool, key: Hashable, inputs: StepInputs) -> Tensor:
        try:
            return self._shapes.run(refresh, key, inputs)
        except BaseException:
            self._dispatcher.rearm()  # the next call refreshes: nothing half-done is reused
            raise
