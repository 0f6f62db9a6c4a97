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
    FastCacheError,
    HandleDisabledError,
    InvalidConfigError,
    InvalidInputError,
    ReentrantCallError,
    ShapeLimitError,
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
from .dispatch import steps_in_call
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


def _uses_graphs(config: FastCacheConfig, device: torch.device) -> bool:
    """Whether CUDA Graphs are captured (on a CUDA device unless the config says otherwise)."""
    return config.cuda_graphs if config.cuda_graphs is not None else device.type == "cuda"


def _make_runner(split: UNetSplit, config: FastCacheConfig, device: torch.device) -> Runner:
    use_graphs = _uses_graphs(config, device)
    if use_graphs and device.type != "cuda":
        raise InvalidConfigError(f"cuda_graphs=True needs the U-Net on a CUDA device; it is on {device}")
    compiled = (
        CompiledFunctions(split, _compile_kwargs(config), config.strict)
        if config.compile
        else None
    )
    runner: Runner
    if use_graphs or config.emulate_graphs:
        runner = GraphRunner(split, compiled, emulate=not use_graphs, strict=config.strict)
    elif compiled is not None:
        runner = CompiledRunner(compiled)
    else:
        runner = EagerRunner(split)
    runner.allow_new_shapes = not config.strict  # every runtime refuses unwarmed shapes in strict mode
    return runner


# diffusers model hooks (diffusers/hooks) that the eager split runs exactly as diffusers does:
# layerwise casting swaps each layer's weights to the compute dtype around its own forward, which
# the split calls like UNet2DConditionModel.forward does. Any other hook (group offloading, the
# caching hooks) is refused, and every hook is refused where graphs are compiled or captured.
EAGER_DIFFUSERS_HOOKS = frozenset({"layerwise_casting", "peft_autocast_disable"})


def diffusers_hooks(unet: Any) -> set[str]:
    """Names of the diffusers model hooks registered on `unet` or any of its modules."""
    names: set[str] = set()
    for module in unet.modules():
        registry = module.__dict__.get("_diffusers_hook")
        names.update(getattr(registry, "hooks", None) or ())
    return names


def _check_hooks(unet: Any, config: FastCacheConfig, device: torch.device) -> None:
    """Refuse diffusers hooks the configured runtime cannot run exactly (never a wrong image)."""
    names = diffusers_hooks(unet)
    if not names:
        return
    if config.compile or config.emulate_graphs or _uses_graphs(config, device):
        raise UnsupportedPipelineError(
            f"the U-Net has diffusers model hooks ({', '.join(sorted(names))}: enable_layerwise_casting, "
            "enable_group_offload...), which cast or move its weights around each layer's forward: a "
            "compiled graph would bake that in and a CUDA Graph would read stale weight storage. "
            "Accelerate with compile=False, cuda_graphs=False (layerwise casting then runs exactly, "
            "without graphs), or remove the hooks"
        )
    unsupported = names - EAGER_DIFFUSERS_HOOKS
    if unsupported:
        raise UnsupportedPipelineError(
            f"the U-Net has diffusers model hooks fastcache does not support ({', '.join(sorted(unsupported))}; "
            "group offloading and diffusers' caching hooks change which weights and features a layer "
            "sees); layerwise casting is the one hook supported, with compile=False, cuda_graphs=False"
        )


def _check_unet(unet: Any, config: FastCacheConfig) -> UNetSplit:
    """Everything fastcache needs of a U-Net before patching it; returns its split. Raises (and
    changes nothing) when it cannot accelerate it: at `accelerate`, and for a replaced U-Net."""
    split = UNetSplit(unet, config.cache_branch_id)
    if config.cuda_graphs and unet.device.type != "cuda":
        raise InvalidConfigError(f"cuda_graphs=True needs the U-Net on a CUDA device; it is on {unet.device}")
    if getattr(unet, "_hf_hook", None) is not None:
        raise UnsupportedPipelineError(
            "this pipeline's U-Net has accelerate hooks (enable_model_cpu_offload, "
            "enable_sequential_cpu_offload or a device_map); fastcache does not support model "
            "offload yet: keep the pipeline on one device (pipe.to('cuda'))"
        )
    _check_hooks(unet, config, unet.device)
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
    return split


def _check_inputs(unet: Any, sample: Any, encoder_hidden_states: Tensor) -> None:
    """Refuse, before anything runs, inputs that cannot fit this U-Net (plain diffusers fails on
    them too, less clearly). Anything subtler is judged by running the eager split (FastCache._run)."""
    config = unet.config
    problems = []
    if not torch.is_tensor(sample) or sample.dim() != 4 or not sample.is_floating_point():
        described = f"a {sample.dim()}-d {sample.dtype} tensor" if torch.is_tensor(sample) else type(sample).__name__
        problems.append(f"sample must be a 4-d floating-point tensor (batch, channels, height, width), got {described}")
    elif sample.shape[1] != config.in_channels:
        problems.append(f"sample has {sample.shape[1]} channels; this U-Net takes {config.in_channels}")
    width = config.cross_attention_dim
    if encoder_hidden_states.dim() != 3:
        problems.append(f"encoder_hidden_states must be 3-d (batch, tokens, width), got shape {tuple(encoder_hidden_states.shape)}")
    elif isinstance(width, int) and encoder_hidden_states.shape[-1] != width:
        problems.append(
            f"encoder_hidden_states (prompt embeddings) are {encoder_hidden_states.shape[-1]} wide; this "
            f"U-Net's cross-attention takes {width} (embeddings from another model's text encoder?)"
        )
    if problems:
        raise InvalidInputError("invalid U-Net call: " + "; ".join(problems) + ". Nothing was run.")


class FastCache:
    """The handle `accelerate` returns: warm-up, counters, and `disable()`.

    Construction validates everything before touching the pipeline; any error leaves it as it was.
    """

    def __init__(self, pipe: Any, config: FastCacheConfig) -> None:
        config.validate()
        schedule = config.refresh_schedule()
        unet = _pipeline_unet(pipe)
        if getattr(type(pipe), "_fastcache_handle", None) is not None:
            raise AlreadyAcceleratedError(
                "this pipeline is already accelerated by fastcache; call disable() on its handle first"
            )
        split = _check_unet(unet, config)
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
        # Shapes the runner cannot prepare (see _run): those past RECOMPILE_LIMIT run on this
        # eager split instead; those whose compile or capture failed are refused until warmup()
        # retries them or the model changes (the message of their failure, by key).
        self._fallback = EagerRunner(split)
        self._eager_keys: set[Hashable] = set()
        self._failed: dict[Hashable, str] = {}
        self._warming = False
        self._warned_steps_past: set[int] = set()
        # One pipeline call at a time: the static buffers, the kept features and the dispatcher
        # hold one call's state (see _exclusive).
        self._call_lock = threading.Lock()
        self._call_thread: int | None = None
        # The thread that made the latest U-Net call, or re-armed for one (see _unet_forward).
        self._last_thread: int | None = None
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
        self._warming = True  # prepares shapes past the limit or that failed before, or raises
        before, known = self.compilations, set(self._seen_keys)
        start = time.perf_counter()
        try:
            self.pipe(**kwargs)
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
        finally:
            self._warming = False
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

    @property
    def eager_shapes(self) -> tuple[str, ...]:
        """Shapes served by the eager split because this handle's graphs are full
        (`runtime.RECOMPILE_LIMIT` shapes per U-Net function; see `_run`)."""
        return tuple(sorted(describe_key(key) for key in self._eager_keys))

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
        refreshes, and the model is checked for changes (LoRA loaded, fused, switched...; a
        replaced ``pipe.unet`` is accelerated in place of the previous one) here, as a pipeline
        call does at its start.

        Until a loop first calls reset(), U-Net calls outside a pipeline call check the model on
        every call (safe, but a fingerprint per step: 0.65 ms for SD 1.5's U-Net on the 2-core CPU);
        after it, they trust reset() to be called before each loop, as the warning asks.
        """
        with self._exclusive():  # never in the middle of another thread's pipeline call
            if self.enabled and getattr(self.pipe, "unet", None) is not self.unet:
                self._adopt_unet(self.pipe)  # pipe.unet was replaced: the loop calls the new one
            if self.enabled:
                self._check_model()
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

    def _disable_now(self) -> None:
        if not self.enabled:
            return
        self._uninstall()
        self._runner.release()
        self._fallback.release()
        self.enabled = False

    # -- internals -------------------------------------------------------------------------------
    def _require_enabled(self) -> None:
        if not self.enabled:
            raise HandleDisabledError(
                "this fastcache handle is disabled (disable() was called, or it restored the pipeline "
                "after a compile failure); call fastcache.accelerate(pipe) for a new one"
            )

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

    def _pipelines(self) -> list[Any]:
        return [self.pipe] + [pipe for pipe, _ in self._attached]

    def _adopt_unet(self, pipe: Any) -> None:
        """`pipe.unet` was replaced (a fine-tune, another sample size): accelerate the new U-Net in
        place of the old one, as a model change. The old U-Net gets its own forward back; graphs
        are prepared anew (in strict mode only for the shapes already served), so the images are
        those of accelerating the new U-Net afresh. Raises, changing nothing, when the new U-Net
        cannot be accelerated or other pipelines of this handle still use the old one."""
        new = getattr(pipe, "unet", None)
        stale = [type(other).__name__ for other in self._pipelines() if getattr(other, "unet", None) is not new]
        if stale:
            raise UnsupportedPipelineError(
                f"this {type(pipe).__name__}'s unet was replaced, but the pipelines sharing this handle "
                f"({', '.join(stale)}) still use the previous one: one handle accelerates one U-Net. Set the "
                "new U-Net on every attached pipeline, or put the previous one back"
            )
        try:
            split = _check_unet(new, self.config)
        except FastCacheError as error:
            raise type(error)(
                f"this {type(pipe).__name__}'s unet was replaced after fastcache.accelerate, and the new one "
                f"cannot be accelerated: {error}. Put the previous U-Net back, or call disable() on the "
                "handle to run the new one without fastcache"
            ) from error
        logger.info("pipe.unet was replaced: fastcache accelerates the new U-Net and prepares its graphs again")
        new_patch = InstancePatch(new, "forward", self._unet_forward)
        new_patch.apply()
        self._unet_patch.undo()
        self._unet_patch = new_patch
        self.unet, self.split = new, split
        self._rebuild(new.device)

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
        # Hooks change weights, so they change the fingerprint: checked here at no per-call cost.
        _check_hooks(self.unet, self.config, self.unet.device)
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
        self._fallback.release()
        self._fallback = EagerRunner(self.split)  # the split may be a new U-Net's (_adopt_unet)
        self._eager_keys.clear()  # the new runner has room for them, and failures may not recur
        self._failed.clear()
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
        if self._call_thread != threading.get_ident():
            # Not inside this thread's pipeline call: hold the handle's lock for this one U-Net call,
            # so that it waits for another thread's pipeline call (whose step counter, kept features
            # and static buffers it would otherwise share) instead of running in its middle.
            with self._exclusive():
                return self._unet_forward(
                    sample, timestep, encoder_hidden_states, class_labels, timestep_cond, attention_mask,
                    cross_attention_kwargs, added_cond_kwargs, down_block_additional_residuals,
                    mid_block_additional_residual, down_intrablock_additional_residuals,
                    encoder_attention_mask, return_dict,
                )
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
        _check_inputs(self.unet, sample, encoder_hidden_states)
        if sample.device != self._device:
            self._move_to(sample.device)
        if self._calling_pipe is None and self._last_thread != threading.get_ident():
            # A direct call after another thread's pipeline call or loop: their step counter and kept
            # features are not this caller's, so it starts afresh (a refresh) rather than continue them.
            self._dispatcher.rearm()
        self._last_thread = threading.get_ident()
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
            if self._dispatcher.step == 0 and not self._warming:
                self._warn_steps_past(calling.scheduler)
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

    def _warn_steps_past(self, scheduler: Any) -> None:
        """An explicit schedule's steps that this call never reaches: said once per call length."""
        schedule = self._dispatcher.schedule
        num_steps = steps_in_call(scheduler)
        if not isinstance(schedule, ExplicitSchedule) or num_steps is None or num_steps in self._warned_steps_past:
            return
        past = schedule.steps_past(num_steps)
        if past:
            self._warned_steps_past.add(num_steps)
            logger.warning(
                "schedule refresh step(s) %s are past the %d steps of this call and never run: it refreshes "
                "at steps %s only (steps count from 0 in each call). Said once per number of steps.",
                past, num_steps, sorted(step for step in schedule.steps | {0} if step < num_steps),
            )

    def _run(self, refresh: bool, key: Hashable, inputs: StepInputs) -> Tensor:
        """Run one U-Net call on the runner; what happens to a shape it cannot prepare:

        * inputs that the eager split fails on too: InvalidInputError, nothing changes;
        * past RECOMPILE_LIMIT shapes: the shape runs on the eager split from then on (the same
          computation, uncompiled), with a warning; warmup() raises ShapeLimitError instead;
        * a compile or capture failure of a valid input: CompileError. If the handle never served
          a shape, it restores the pipeline first (nothing works: the backend or a setting); else
          only this shape is refused, now and on later calls (no recompiling on every request),
          until warmup() retries it or the model changes; prepared shapes keep their graphs.
        """
        try:
            return self._run_or_raise(refresh, key, inputs)
        except BaseException:
            self._dispatcher.rearm()  # the next call refreshes: nothing half-done is reused
            raise

    def _run_or_raise(self, refresh: bool, key: Hashable, inputs: StepInputs) -> Tensor:
        if key in self._eager_keys:
            if self._warming:
                raise ShapeLimitError(
                    f"{describe_key(key)} runs on the eager split: this handle's graphs were full when it "
                    "was first served (fastcache.runtime.RECOMPILE_LIMIT shapes per U-Net function), so "
                    "warmup() cannot prepare graphs for it; the prepared shapes keep theirs"
                )
            return self._fallback.refresh(key, inputs) if refresh else self._fallback.cached(key, inputs)
        runner = self._runner
        if runner.is_prepared(key, refresh):
            return runner.refresh(key, inputs) if refresh else runner.cached(key, inputs)
        if key in self._failed and not self._warming:
            raise CompileError(
                f"fastcache could not prepare the U-Net graphs for {describe_key(key)} earlier "
                f"({self._failed[key]}), so this shape is refused without trying again; the handle keeps "
                "serving the shapes it prepared. warmup() at this shape tries again."
            )
        try:
            noise = runner.refresh(key, inputs) if refresh else runner.cached(key, inputs)
        except ShapeLimitError as error:
            if self._warming or not refresh:
                raise ShapeLimitError(
                    f"{error}. The prepared shapes keep their graphs; serving calls at this shape "
                    "(strict=False) run it on the eager split. Raise fastcache.runtime.RECOMPILE_LIMIT "
                    "before accelerate to hold more shapes."
                ) from error
            return self._run_past_limit(key, inputs, error)
        except FastCacheError:  # ShapeNotWarmedError, and errors that say what to do already
            raise
        except Exception as error:
            raise self._preparation_failed(refresh, key, inputs, error) from error
        self._failed.pop(key, None)
        return noise

    def _run_past_limit(self, key: Hashable, inputs: StepInputs, error: ShapeLimitError) -> Tensor:
        """A new shape past RECOMPILE_LIMIT, while serving: its own eager split, warned once."""
        self._eager_keys.add(key)
        logger.warning(
            "%s: it runs on the eager split (the same computation, uncompiled and without graphs) "
            "from now on, and the prepared shapes keep theirs. Warm up the shapes you serve, or raise "
            "fastcache.runtime.RECOMPILE_LIMIT before accelerate.", error,
        )
        return self._fallback.refresh(key, inputs)

    def _preparation_failed(
        self, refresh: bool, key: Hashable, inputs: StepInputs, error: Exception
    ) -> FastCacheError:
        """The error to raise for a failure while preparing `key` (see `_run`)."""
        eager_error = error if isinstance(self._runner, EagerRunner) else self._eager_failure(inputs)
        if eager_error is not None:
            return InvalidInputError(
                f"this U-Net call's inputs fail in the plain (eager) U-Net too, so they are the "
                f"caller's error: {type(eager_error).__name__}: {eager_error}. Shapes: "
                f"{describe_key(key)}. fastcache changed nothing and stays enabled."
            )
        summary = f"{type(error).__name__}: {error}"
        which = "full" if refresh else "shallow"
        if not self._seen_keys:
            self.disable()
            return CompileError(
                f"fastcache could not prepare the {which} U-Net graph for {describe_key(key)}: {summary}\n"
                "It had not served any shape, so the pipeline was restored to its original state. To "
                "narrow it down, accelerate with cuda_graphs=False, then compile=False."
            )
        self._failed[key] = summary
        return CompileError(
            f"fastcache could not prepare the {which} U-Net graph for {describe_key(key)}: {summary}\n"
            "Only this shape is refused (now and on later calls, until warmup() at this shape tries "
            "again or the model changes); the handle stays enabled and keeps its prepared shapes."
        )

    def _eager_failure(self, inputs: StepInputs) -> Exception | None:
        """What the eager split raises on `inputs`, or None: tells a bad input from a compile or
        capture failure (only on that failure path; it costs one uncompiled U-Net run)."""
        try:
            self.split.full(*inputs.args())
        except Exception as error:  # noqa: BLE001 (returned: the caller's input error)
            return error
        return None
