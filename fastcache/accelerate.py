"""`accelerate(pipe)`: install fastcache on a diffusers pipeline; the handle that undoes it.

Two things change on the pipeline, both undone exactly by `FastCache.disable()`:

* ``pipe.unet.forward`` (an instance attribute; the class's forward is untouched) becomes the
  dispatcher + runner: each U-Net call runs the full or the shallow graph;
* ``pipe.__class__`` becomes a same-named subclass whose ``__call__`` re-arms the dispatcher, so
  the first U-Net call of every pipeline call is a refresh (and takes the handle's lock, so that
  calls from several threads run one after the other). `FastCache.attach` does the same to
  another pipeline that shares the U-Net.

Options add instance attributes of the same kind, also undone by `disable()`:
``pipe.controlnet.forward`` with ``controlnet_reuse=True`` (controlnet_reuse.py), and
``pipe.vae.decode`` / ``pipe.text_encoder*.forward`` with ``compile_vae`` /
``compile_text_encoders`` (side_models.py); ``host_timesteps=True`` sets
``pipe.scheduler.set_timesteps`` during each pipeline call only (host_timesteps.py).

Nothing else is patched: no sub-module, no weight, and no scheduler outside the option above.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Mapping

import torch
from torch import Tensor

from .config import FastCacheConfig
from .controlnet_reuse import ControlNetReuse
from .dispatch import StepDispatcher
from .errors import (
    AlreadyAcceleratedError,
    CompileError,
    InvalidConfigError,
    ReentrantCallError,
    ShapeNotWarmedError,
    UnsupportedInputError,
    UnsupportedPipelineError,
)
from .graphs import GraphRunner
from .host_timesteps import timesteps_on_host
from .lora import LoraScales, model_fingerprint
from .patching import InstancePatch
from .runtime import (
    CompiledFunctions,
    CompiledRunner,
    EagerRunner,
    MemoryReport,
    Runner,
    StepInputs,
    autograd_off,
    compile_kwargs,
    describe_key,
)
from .schedule import ExplicitSchedule, UniformSchedule
from .side_models import CompileFailure, SideModels
from .unet_split import ADDED_COND_KWARGS, CROSS_ATTENTION_KWARGS, UNetSplit

logger = logging.getLogger("fastcache")


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


def _pipeline_unet(pipe: Any) -> Any:
    unet = getattr(pipe, "unet", None)
    if unet is None or not callable(pipe) or not hasattr(pipe, "scheduler"):
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__} is not a pipeline fastcache can accelerate: it needs a `unet` "
            "(UNet2DConditionModel) and a `scheduler`, as StableDiffusion*/StableDiffusionXL* pipelines have"
        )
    return unet


def _accelerated_class(base: type, handle: "FastCache") -> type:
    """A subclass of `base`, named like it, whose __call__ re-arms `handle` first."""
    base_call = base.__call__

    @functools.wraps(base_call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if handle._calling_pipe is not None and handle._call_thread == threading.get_ident():
            raise ReentrantCallError(
                "the accelerated pipeline was called from inside one of its own calls (a step "
                "callback?); fastcache runs one call at a time per pipeline. Make that call after "
                "the outer one returns, or on another pipeline."
            )
        with handle._exclusive():
            handle._begin_pipeline_call(self)
            handle._calling_pipe = self
            try:
                with timesteps_on_host(self.scheduler) if handle.config.host_timesteps else contextlib.nullcontext():
                    return base_call(self, *args, **kwargs)
            except CompileFailure as failure:
                handle.disable()
                raise CompileError(
                    f"fastcache failed {failure.where}: {failure.__cause__!r}\nThe pipeline was restored "
                    "to its original state; accelerate without compile_vae / compile_text_encoders to "
                    "leave that model eager."
                ) from failure.__cause__
            finally:
                handle._calling_pipe = None

    namespace = {
        "__call__": __call__,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "_fastcache_handle": handle,
    }
    return type(base.__name__, (base,), namespace)


def _compile_kwargs(config: FastCacheConfig) -> dict[str, Any]:
    return compile_kwargs(config.compile_backend, config.compile_mode, dict(config.compile_options))


def _make_runner(split: UNetSplit, config: FastCacheConfig, device: torch.device) -> Runner:
    use_graphs = config.cuda_graphs if config.cuda_graphs is not None else device.type == "cuda"
    if use_graphs and device.type != "cuda":
        raise InvalidConfigError(f"cuda_graphs=True needs the U-Net on a CUDA device; it is on {device}")
    compiled = (
        CompiledFunctions(split, _compile_kwargs(config), config.strict)
        if config.compile
        else None
    )
    if use_graphs or config.emulate_graphs:
        return GraphRunner(split, compiled, emulate=not use_graphs, strict=config.strict)
    if compiled is not None:
        return CompiledRunner(compiled)
    return EagerRunner(split)


class FastCache:
    """The handle `accelerate` returns: warm-up, counters, and `disable()`.

    Construction validates everything before touching the pipeline; any error leaves it as it was.
    """

    def __init__(self, pipe: Any, config: FastCacheConfig) -> None:
        config.validate()
        schedule = config.refresh_schedule()
        unet = _pipeline_unet(pipe)
        split = UNetSplit(unet, config.cache_branch_id)
        if getattr(unet, "_hf_hook", None) is not None:
            raise UnsupportedPipelineError(
                "this pipeline's U-Net has accelerate hooks (enable_model_cpu_offload, "
                "enable_sequential_cpu_offload or a device_map); fastcache does not support model "
                "offload yet: keep the pipeline on one device (pipe.to('cuda'))"
            )
        if getattr(type(pipe), "_fastcache_handle", None) is not None:
            raise AlreadyAcceleratedError(
                "this pipeline is already accelerated by fastcache; call disable() on its handle first"
            )
        previous_forward = vars(unet).get("forward")
        owner = getattr(previous_forward, "__self__", None)
        if isinstance(owner, FastCache):
            raise AlreadyAcceleratedError(
                f"this pipeline's U-Net is already accelerated by fastcache for a "
                f"{owner._original_class.__name__} "
                "that shares it (from_pipe, or **pipe.components); share that handle's graphs with "
                "handle.attach(pipe) instead"
            )
        if previous_forward is not None and previous_forward != type(unet).forward.__get__(unet):
            raise AlreadyAcceleratedError(
                "pipe.unet.forward is already replaced by another tool (is DeepCache's helper enabled?); "
                "disable it before fastcache.accelerate"
            )
        self.config = config
        self.pipe = pipe
        self.unet = unet
        self.split = split
        self.stats = CallStats()
        self._device = unet.device
        self._dispatcher = StepDispatcher(schedule)
        self._runner = _make_runner(split, config, self._device)
        self._lora = LoraScales(unet, self._device)
        self._fingerprint = model_fingerprint(unet)
        self._compilations_before = 0
        self._original_class = type(pipe)
        # Other pipelines sharing this U-Net (attach), with their own classes; and the pipeline
        # whose call is under way (None between calls), whose scheduler the dispatcher reads.
        self._attached: list[tuple[Any, type]] = []
        self._calling_pipe: Any | None = None
        self._unet_patch = InstancePatch(unet, "forward", self._unet_forward)  # keeps another tool's forward
        self._seen_keys: set[Hashable] = set()
        # One pipeline call at a time: the static buffers, the kept features and the dispatcher
        # hold one call's state (see _exclusive).
        self._call_lock = threading.Lock()
        self._call_thread: int | None = None
        # True once reset() was called: U-Net calls outside a pipeline call then skip the per-call
        # model check and the warning (see reset()).
        self._loop_managed = False
        self._warned_outside_call = False
        # Validates (raises InvalidConfigError) before anything is changed; installs in the try.
        self._controlnet_reuse = ControlNetReuse(pipe, self._dispatcher) if config.controlnet_reuse else None
        self._side_models = (
            SideModels(pipe, config.compile_vae, config.compile_text_encoders, _compile_kwargs(config))
            if config.compile_vae or config.compile_text_encoders
            else None
        )
        self.enabled = False
        try:
            self._unet_patch.apply()
            if self._controlnet_reuse is not None:
                self._controlnet_reuse.install()
            if self._side_models is not None:
                self._side_models.install()
            pipe.__class__ = _accelerated_class(self._original_class, self)
        except BaseException:
            self._uninstall()
            raise
        self.enabled = True

    def __repr__(self) -> str:
        pipelines = [self._original_class.__name__] + [original.__name__ for _, original in self._attached]
        shapes = sorted(describe_key(key) for key in self._seen_keys)
        return (
            f"FastCache({' + '.join(pipelines)}, cache_interval={self.config.cache_interval}, "
            f"cache_branch_id={self.config.cache_branch_id}, runtime={self.runtime!r}, "
            f"shapes={shapes}, enabled={self.enabled})"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> "FastCache":
        # Reached through the U-Net's patched forward when an accelerated model is deep-copied.
        raise UnsupportedPipelineError(
            "an accelerated pipeline or U-Net cannot be deep-copied (its forward belongs to the "
            "fastcache handle and its graphs): copy it before fastcache.accelerate or after disable()"
        )

    # -- public ----------------------------------------------------------------------------------
    @property
    def compilations(self) -> int:
        """Graphs compiled by this handle so far (one per function and shape, counted again when
        a model change made them be prepared anew)."""
        return self._compilations_before + self._runner.compilations

    def warmup(
        self,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 1,
        num_inference_steps: int = 3,
        **call_kwargs: Any,
    ) -> WarmupReport:
        """Compile (and on CUDA capture) both graphs for one resolution and batch size.

        Runs the pipeline once with an empty prompt, `num_inference_steps` steps, latent output, a
        fixed generator, and the schedule forced to refresh at step 0 only, so the full and the
        shallow graph both run. Pass any other call argument (``guidance_scale``, ``image`` and
        ``strength`` for img2img...) as the serving calls will: the shapes must match theirs.
        """
        with self._exclusive():  # no other thread's call may run with the warm-up's schedule
            return self._warmup(height, width, batch_size, num_inference_steps, call_kwargs)

    def _warmup(
        self, height: int | None, width: int | None, batch_size: int, num_inference_steps: int,
        call_kwargs: dict[str, Any],
    ) -> WarmupReport:
        self._require_enabled()
        kwargs: dict[str, Any] = dict(
            num_images_per_prompt=batch_size,
            num_inference_steps=num_inference_steps,
            output_type="latent",
            generator=torch.Generator("cpu").manual_seed(0),
        )
        if height is not None:
            kwargs["height"] = height
        if width is not None:
            kwargs["width"] = width
        if self.config.compile_vae:
            kwargs["output_type"] = "np"  # runs the VAE decoder, so its graph is prepared too
        kwargs.update(call_kwargs)
        if "prompt_embeds" not in kwargs:
            kwargs.setdefault("prompt", "")
        caching = self._dispatcher.schedule.caches
        self._dispatcher.force(ExplicitSchedule(frozenset({0})) if caching else UniformSchedule(1))
        self._runner.allow_new_shapes = True
        before, known = self.compilations, set(self._seen_keys)
        start = time.perf_counter()
        try:
            self.pipe(**kwargs)
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
        finally:
            self._dispatcher.force(None)
            if self.enabled:
                self._runner.allow_new_shapes = not self.config.strict
        if caching and not any(not refresh for refresh in self.stats.last_call):
            logger.warning(
                "warm-up ran no cached step, so the shallow graph is not prepared; give warmup() "
                "enough steps (num_inference_steps, img2img strength) for at least two to run"
            )
        new = tuple(describe_key(key) for key in self._seen_keys - known)
        return WarmupReport(time.perf_counter() - start, new, self.compilations - before)

    def attach(self, pipe: Any) -> None:
        """Accelerate another pipeline that shares this one's U-Net (``from_pipe``, or built from
        ``**pipe.components``: an img2img or inpaint pipeline beside a text-to-image one).

        Both pipelines then use the same graphs (one per input shape, whichever pipeline made it),
        settings and counters; each call re-arms at its start and follows the calling pipeline's
        scheduler. `disable()` restores both. Without this, the other pipeline's calls would run
        the accelerated U-Net with no re-arm at their start.
        """
        self._require_enabled()
        with self._exclusive():
            if getattr(pipe, "unet", None) is not self.unet:
                raise UnsupportedPipelineError(
                    f"attach() needs a pipeline that shares this handle's U-Net (pipe.unet is the same "
                    f"object); {type(pipe).__name__}'s U-Net is another one: accelerate it on its own"
                )
            if pipe is self.pipe or getattr(type(pipe), "_fastcache_handle", None) is not None:
                raise AlreadyAcceleratedError(f"this {type(pipe).__name__} is already accelerated by fastcache")
            if self._controlnet_reuse is not None:
                raise InvalidConfigError(
                    "attach() does not support controlnet_reuse (it follows one pipeline's ControlNet); "
                    "accelerate without controlnet_reuse to share the U-Net between pipelines"
                )
            if not hasattr(pipe, "scheduler"):
                raise UnsupportedPipelineError(f"{type(pipe).__name__} has no scheduler")
            original = type(pipe)
            pipe.__class__ = _accelerated_class(original, self)
            self._attached.append((pipe, original))

    def memory(self) -> MemoryReport:
        """Device memory fastcache holds between calls beyond the pipeline's own (bytes): static
        input and output buffers, kept features, and on CUDA the graphs' shared memory pool."""
        return self._runner.memory()

    @property
    def runtime(self) -> str:
        """What runs the U-Net: "eager", "compiled", "cuda-graphs" or "emulated-graphs"."""
        runner = self._runner
        if isinstance(runner, GraphRunner):
            return "emulated-graphs" if runner.emulate else "cuda-graphs"
        return "compiled" if isinstance(runner, CompiledRunner) else "eager"

    def reset(self) -> None:
        """Start a custom denoising loop that calls ``pipe.unet`` directly: the next U-Net call
        refreshes, and the model is checked for changes (LoRA loaded, fused, switched...) here, as
        a pipeline call does at its start.

        Until a loop first calls reset(), U-Net calls outside a pipeline call check the model on
        every call (safe, but a fingerprint per step: 0.65 ms for SD 1.5's U-Net on the 2-core CPU);
        after it, they trust reset() to be called before each loop, as the warning asks.
        """
        if self.enabled:
            self._check_model()
        self._dispatcher.rearm()
        self._loop_managed = True

    def disable(self) -> None:
        """Restore the pipeline exactly as it was and free graphs and cached features.

        From another thread, waits for a pipeline call under way to finish (its graphs are in
        use); from inside a call (fastcache's own error handling, a step callback) it acts at once.
        """
        with self._exclusive():
            self._disable_now()

    def _disable_now(self) -> None:
        if not self.enabled:
            return
        self._uninstall()
        self._runner.release()
        self.enabled = False

    # -- internals -------------------------------------------------------------------------------
    def _require_enabled(self) -> None:
        if not self.enabled:
            raise RuntimeError("this fastcache handle is disabled; call fastcache.accelerate(pipe) again")

    def _uninstall(self) -> None:
        self._unet_patch.undo()
        if getattr(type(self.pipe), "_fastcache_handle", None) is self:
            self.pipe.__class__ = self._original_class
        for pipe, original in reversed(self._attached):
            if getattr(type(pipe), "_fastcache_handle", None) is self:
                pipe.__class__ = original
        self._attached.clear()
        if self._controlnet_reuse is not None:
            self._controlnet_reuse.uninstall()
        if self._side_models is not None:
            self._side_models.uninstall()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One pipeline call, warm-up or disable() at a time; other threads wait their turn.

        A call's graphs, static buffers, kept features and step counter are shared by every call
        of this handle, so overlapping calls (a threaded web server's workers) would silently mix
        their steps; queueing them costs nothing on one GPU, whose stream runs one call's kernels
        at a time anyway. The thread that holds the lock passes (warmup's own pipeline call,
        disable() from fastcache's error handling inside a call).
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
            raise UnsupportedInputError(
                f"this {type(pipe).__name__}'s unet was replaced after fastcache.accelerate, so it "
                "would run without fastcache; call disable() on the handle, then accelerate the "
                "pipeline again with its new U-Net"
            )
        if getattr(self.unet, "_hf_hook", None) is not None:
            raise UnsupportedInputError(
                "the U-Net got accelerate hooks (enable_model_cpu_offload / device_map) after "
                "fastcache.accelerate; fastcache does not support model offload yet. Call disable() on "
                "the fastcache handle before enabling offload."
            )
        self._check_model()
        self._dispatcher.rearm()
        self.stats.pipeline_calls += 1
        self.stats.last_call = []

    def _move_to(self, device: torch.device) -> None:
        """The pipeline was moved (``pipe.to``) after accelerate: new runner, graphs made anew."""
        logger.warning("the U-Net moved from %s to %s: fastcache prepares its graphs again there", self._device, device)
        self._rebuild(device)

    def _check_model(self) -> None:
        """Prepare graphs again if the U-Net changed since they were built (see lora.py): LoRA
        adapters loaded, fused, switched or deleted, or weights given new storage."""
        fingerprint = model_fingerprint(self.unet)
        if fingerprint == self._fingerprint:
            return
        if self.unet.device != self._device:  # pipe.to(another device): new storage, new device
            self._move_to(self.unet.device)
            return
        logger.info(
            "the U-Net's modules, adapters or weight storage changed since fastcache built its graphs "
            "(load_lora_weights, fuse_lora, set_adapters with other adapters, ...): preparing them again"
        )
        self._rebuild(self._device)

    def _rebuild(self, device: torch.device) -> None:
        """A new runner (graphs compiled and captured again on first use) and LoRA scale buffer.

        Shapes this handle already ran may be prepared again even in strict mode: the user changed
        the model, so this compilation is expected rather than a serving surprise.
        """
        old = self._runner
        old.release()
        self._compilations_before += old.compilations
        self._runner = _make_runner(self.split, self.config, device)
        self._runner.allow_new_shapes = old.allow_new_shapes  # warmup() may be under way
        self._runner.rewarm_keys = frozenset(self._seen_keys)
        self._device = device
        self._lora = LoraScales(self.unet, device)
        self._fingerprint = model_fingerprint(self.unet)
        self._dispatcher.rearm()

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
        unsupported = [
            name
            for name, value in (
                ("T2I-Adapter residuals", down_intrablock_additional_residuals),
                (
                    "down-block residuals without a mid-block residual (diffusers' deprecated T2I-Adapter path)",
                    down_block_additional_residuals if mid_block_additional_residual is None else None,
                ),
                ("a mid-block residual without down-block residuals", mid_block_additional_residual
                 if down_block_additional_residuals is None else None),
                ("class_labels", class_labels),
                ("attention_mask", attention_mask),
                ("encoder_attention_mask", encoder_attention_mask),
                ("cross_attention_kwargs other than a LoRA `scale` and `ip_adapter_masks`", {
                    name: value for name, value in (cross_attention_kwargs or {}).items()
                    if name not in CROSS_ATTENTION_KWARGS
                }),
            )
            if value is not None and not (isinstance(value, Mapping) and not value)
        ]
        if torch.is_grad_enabled() and any(
            torch.is_tensor(value) and value.requires_grad for value in (sample, encoder_hidden_states)
        ):
            unsupported.append("inputs that require grad (fastcache runs the U-Net without autograd)")
        extra = set(added_cond_kwargs or {}) - set(ADDED_COND_KWARGS)
        if extra:
            unsupported.append(f"added_cond_kwargs {sorted(extra)} (supported: {sorted(ADDED_COND_KWARGS)})")
        if not torch.is_tensor(encoder_hidden_states):
            unsupported.append(f"encoder_hidden_states of type {type(encoder_hidden_states).__name__}")
        if unsupported:
            raise UnsupportedInputError(
                "fastcache cannot run this U-Net call yet: it passes " + ", ".join(unsupported)
                + ". Call disable() on the fastcache handle to run this pipeline without it."
            )
        if sample.device != self._device:
            self._move_to(sample.device)
        if self._calling_pipe is None and not self._loop_managed:
            self._check_model()
            if not self._warned_outside_call:
                self._warned_outside_call = True
                logger.warning(
                    "pipe.unet was called outside the accelerated pipeline's __call__: fastcache "
                    "re-arms only at the start of its pipelines' calls. Another pipeline sharing this "
                    "U-Net: accelerate it too with handle.attach(other_pipe). A custom loop: call "
                    "reset() on the handle before each denoising loop (until then every such call "
                    "also re-checks the model for LoRA changes)"
                )
        with autograd_off():  # the same state in and out of the caller's torch.inference_mode
            inputs = StepInputs.from_unet_call(
                sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                down_block_additional_residuals, mid_block_additional_residual,
                (cross_attention_kwargs or {}).get("ip_adapter_masks"),
            )
            key = inputs.key()
            calling = self._calling_pipe if self._calling_pipe is not None else self.pipe  # a custom loop
            self._dispatcher.locate(calling.scheduler, timestep)  # PNDM img2img: DeepCache's step numbers
            refresh = self._dispatcher.next_call(calling.scheduler, key)
            if self._controlnet_reuse is not None:  # stores (or, as a safety net, recomputes) its residuals
                inputs = self._controlnet_reuse.unet_call(refresh, key, inputs)
            lora_scale = (cross_attention_kwargs or {}).get("scale", 1.0)  # a number or a tensor (lora.py)
            with self._lora.applied(lora_scale):
                noise = self._run(refresh, key, inputs)
        self._seen_keys.add(key)  # served (a shape refused in strict mode is not "seen")
        self.stats.last_call.append(refresh)
        if refresh:
            self.stats.refresh_steps += 1
        else:
            self.stats.cached_steps += 1
        if not return_dict:
            return (noise,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise)

    def _run(self, refresh: bool, key: Hashable, inputs: StepInputs) -> Tensor:
        runner = self._runner
        if runner.is_prepared(key, refresh):
            return runner.refresh(key, inputs) if refresh else runner.cached(key, inputs)
        try:
            return runner.refresh(key, inputs) if refresh else runner.cached(key, inputs)
        except ShapeNotWarmedError:
            raise
        except Exception as error:
            self.disable()
            raise CompileError(
                f"fastcache could not prepare the {'full' if refresh else 'shallow'} U-Net graph for "
                f"{describe_key(key)}: {type(error).__name__}: {error}\nThe pipeline was restored to its "
                "original state. To narrow it down, accelerate with cuda_graphs=False, then compile=False."
            ) from error
