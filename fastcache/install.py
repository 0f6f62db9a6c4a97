"""What fastcache changes on a pipeline, and how it is put back exactly.

Two things change on the pipeline, both undone by `Installation.uninstall` (`FastCache.disable`):

* ``pipe.unet.forward`` (an instance attribute; the class's forward is untouched) becomes the
  handle's step path: each U-Net call runs the full or the shallow graph;
* ``pipe.__class__`` becomes a same-named subclass whose ``__call__`` runs through the handle, so
  the first U-Net call of every pipeline call is a refresh and calls from several threads take
  turns. `Installation.attach` does the same to another pipeline that shares the U-Net.

The U-Net also gets `model_watch.ModelWatch`'s wrappers of diffusers' entry points (instance
attributes too) and torch's registration hooks, so that model changes are noticed without a scan
per call. Options add instance attributes of the same kind: ``pipe.controlnet.forward`` with
``controlnet_reuse=True``, ``pipe.vae.decode`` / ``pipe.text_encoder*.forward`` with
``compile_vae`` / ``compile_text_encoders``; ``host_timesteps=True`` sets
``pipe.scheduler.set_timesteps`` during each pipeline call only (host_timesteps.py).

Nothing else is patched: no sub-module, no weight, and no scheduler outside that option. This
module also holds the checks that decide whether a U-Net can be patched at all.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol

from .config import FastCacheConfig
from .errors import AlreadyAcceleratedError, InvalidConfigError, UnsupportedPipelineError
from .model_watch import ModelWatch
from .patching import InstancePatch
from .unet_split import UNetSplit, tgate_support

# diffusers model hooks (diffusers/hooks) that the eager split runs exactly as diffusers does:
# layerwise casting swaps each layer's weights to the compute dtype around its own forward, which
# the split calls like UNet2DConditionModel.forward does. Any other hook (group offloading, the
# caching hooks) is refused, and every hook is refused where graphs are compiled or captured.
EAGER_DIFFUSERS_HOOKS = frozenset({"layerwise_casting", "peft_autocast_disable"})


class Part(Protocol):
    """An optional patch (controlnet_reuse.py, side_models.py) installed with the rest."""

    def install(self) -> None: ...

    def uninstall(self) -> None: ...


def pipeline_unet(pipe: Any) -> Any:
    """`pipe`'s U-Net, or UnsupportedPipelineError for an object that is not such a pipeline."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not callable(pipe) or not hasattr(pipe, "scheduler"):
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__} is not a pipeline fastcache can accelerate: it needs a `unet` "
            "(UNet2DConditionModel) and a `scheduler`, as StableDiffusion*/StableDiffusionXL* pipelines have"
        )
    return unet


def handle_of(pipe: Any) -> Any:
    """The fastcache handle that accelerates `pipe`, or None."""
    return getattr(type(pipe), "_fastcache_handle", None)


def uses_graphs(config: FastCacheConfig, device: Any) -> bool:
    """Whether CUDA Graphs are captured (on a CUDA device unless the config says otherwise)."""
    return config.cuda_graphs if config.cuda_graphs is not None else device.type == "cuda"


def diffusers_hooks(unet: Any) -> set[str]:
    """Names of the diffusers model hooks registered on `unet` or any of its modules."""
    names: set[str] = set()
    for module in unet.modules():
        registry = module.__dict__.get("_diffusers_hook")
        names.update(getattr(registry, "hooks", None) or ())
    return names


def check_hooks(unet: Any, config: FastCacheConfig) -> None:
    """Refuse diffusers hooks the configured runtime cannot run exactly (never a wrong image)."""
    names = diffusers_hooks(unet)
    if not names:
        return
    if config.compile or config.emulate_graphs or uses_graphs(config, unet.device):
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


def check_unet(unet: Any, config: FastCacheConfig) -> UNetSplit:
    """Everything fastcache needs of a U-Net before patching it; returns its split. Raises (and
    changes nothing) when it cannot accelerate it: at `accelerate`, and for a replaced U-Net."""
    split = UNetSplit(unet, config.cache_branch_id)
    if config.gate_step is not None:
        tgate_support(unet)
    if config.cuda_graphs and unet.device.type != "cuda":
        raise InvalidConfigError(f"cuda_graphs=True needs the U-Net on a CUDA device; it is on {unet.device}")
    if getattr(unet, "_hf_hook", None) is not None:
        raise UnsupportedPipelineError(
            "this pipeline's U-Net has accelerate hooks (enable_model_cpu_offload, "
            "enable_sequential_cpu_offload or a device_map); fastcache does not support model "
            "offload yet: keep the pipeline on one device (pipe.to('cuda'))"
        )
    check_hooks(unet, config)
    previous_forward = vars(unet).get("forward")
    owner = getattr(previous_forward, "__self__", None)
    if getattr(owner, "accelerates_unet", False):
        raise AlreadyAcceleratedError(
            f"this pipeline's U-Net is already accelerated by fastcache for a {owner.pipeline_names()[0]} "
            "that shares it (from_pipe, or **pipe.components); share that handle's graphs with "
            "handle.attach(pipe) instead"
        )
    if previous_forward is not None and previous_forward != type(unet).forward.__get__(unet):
        raise AlreadyAcceleratedError(
            "pipe.unet.forward is already replaced by another tool (is DeepCache's helper enabled?); "
            "disable it before fastcache.accelerate"
        )
    return split


# Pipeline methods (diffusers' LoRA, IP-Adapter, FreeU and QKV loaders) that change the U-Net in
# place without going through one of its own methods (``unfuse_lora`` unmerges each PEFT layer):
# the accelerated class tells the model watch after each (model_watch.py). Absent ones are skipped.
PIPELINE_WATCHED_METHODS = (
    "load_lora_weights", "unload_lora_weights", "fuse_lora", "unfuse_lora", "set_adapters", "delete_adapters",
    "enable_lora", "disable_lora", "set_lora_device", "load_ip_adapter", "unload_ip_adapter",
    "set_ip_adapter_scale", "enable_freeu", "disable_freeu", "fuse_qkv_projections", "unfuse_qkv_projections",
)


def _noting_changes(method: Callable[..., Any], handle: Any) -> Callable[..., Any]:
    @functools.wraps(method)
    def noted(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:  # a call that failed half-way may have changed something too
            handle.note_model_change()

    return noted


def accelerated_class(base: type, handle: Any) -> type:
    """A subclass of `base`, named like it, whose ``__call__`` runs through ``handle.pipeline_call``
    and whose model-changing methods tell the handle (`PIPELINE_WATCHED_METHODS`)."""
    base_call = base.__call__

    @functools.wraps(base_call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return handle.pipeline_call(self, lambda: base_call(self, *args, **kwargs))

    namespace: dict[str, Any] = {
        name: _noting_changes(getattr(base, name), handle)
        for name in PIPELINE_WATCHED_METHODS
        if callable(getattr(base, name, None))
    }
    namespace.update({
        "__call__": __call__,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "_fastcache_handle": handle,
    })
    return type(base.__name__, (base,), namespace)


class Installation:
    """The patches of one handle: applied together, undone together, in reverse order."""

    def __init__(self, pipe: Any, unet: Any, handle: Any, unet_forward: Callable[..., Any], parts: list[Part]) -> None:
        self.handle = handle
        self.pipe = pipe
        self.original_class = type(pipe)
        self.unet = unet
        self._unet_forward = unet_forward
        self._forward_patch = InstancePatch(unet, "forward", unet_forward)  # keeps another tool's forward
        self._parts = parts
        self.watch: ModelWatch | None = None
        # Other pipelines sharing this U-Net (attach), with their own classes.
        self.attached: list[tuple[Any, type]] = []

    def install(self) -> None:
        """Apply every patch; on any error, undo what was applied and re-raise."""
        try:
            self._forward_patch.apply()
            self.watch = ModelWatch(self.unet)
            for part in self._parts:
                part.install()
            self.pipe.__class__ = accelerated_class(self.original_class, self.handle)
        except BaseException:
            self.uninstall()
            raise

    def pipelines(self) -> list[Any]:
        return [self.pipe] + [pipe for pipe, _ in self.attached]

    def attach(self, pipe: Any) -> None:
        """Patch `pipe`, another pipeline with this U-Net, to run through the handle too."""
        if getattr(pipe, "unet", None) is not self.unet:
            raise UnsupportedPipelineError(
                f"attach() needs a pipeline that shares this handle's U-Net (pipe.unet is the same "
                f"object); {type(pipe).__name__}'s U-Net is another one: accelerate it on its own"
            )
        if pipe is self.pipe or handle_of(pipe) is not None:
            raise AlreadyAcceleratedError(f"this {type(pipe).__name__} is already accelerated by fastcache")
        if not hasattr(pipe, "scheduler"):
            raise UnsupportedPipelineError(f"{type(pipe).__name__} has no scheduler")
        original = type(pipe)
        pipe.__class__ = accelerated_class(original, self.handle)
        self.attached.append((pipe, original))

    def replace_unet(self, unet: Any) -> None:
        """Move the forward patch and the watch from the current U-Net to `unet` (a replaced
        ``pipe.unet``); the previous U-Net gets its own forward back."""
        patch = InstancePatch(unet, "forward", self._unet_forward)
        patch.apply()
        self._forward_patch.undo()
        if self.watch is not None:
            self.watch.close()
        self._forward_patch, self.unet = patch, unet
        self.watch = ModelWatch(unet)

    def uninstall(self) -> None:
        """Put everything back as it was (safe to call twice, and after a failed install)."""
        self._forward_patch.undo()
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if handle_of(self.pipe) is self.handle:
            self.pipe.__class__ = self.original_class
        for pipe, original in reversed(self.attached):
            if handle_of(pipe) is self.handle:
                pipe.__class__ = original
        self.attached.clear()
        for part in reversed(self._parts):
            part.uninstall()
