"""Notice, cheaply and at each pipeline call, that a U-Net changed in a way its graphs bake in.

Compiled and captured graphs depend on more than input shapes: which sub-modules and attention
processors run, PEFT's active/merged/disabled adapters, FreeU's factors, feed-forward chunking,
IP-Adapter scales, and the storage every weight lives in. `lora.model_fingerprint` reads all of
that, but walking every module costs 0.6 ms (SD 1.5) to 1.7 ms (SDXL) of host time on a 2-core
CPU, before any GPU work of the call is queued. `ModelWatch` instead tracks the points where such a
change is made, and a call only pays for the full fingerprint after one of them fired:

* sub-modules, parameters and buffers assigned on any of the U-Net's modules (LoRA layers loaded,
  unloaded or deleted, IP-Adapter projections, a weight given new storage by assignment): torch's
  global registration hooks, filtered to this U-Net's modules. One set of them serves every watch
  of the process (`_RegistrationHooks`) and does nothing while dynamo traces: diffusers slices
  ModuleLists inside forward (``self.resnets[1:]`` registers modules on a new list), so dynamo
  guards on these hooks. A hook per watch would make each accelerate or disable of another
  pipeline invalidate every compiled graph of the process (and strict serving raise).
* diffusers' U-Net entry points that change state in place (`WATCHED_METHODS`: PEFT's adapter
  switches, fuse/unfuse, processor and backend setters, FreeU, QKV fusion, and ``_apply``, through
  which ``.to()``, ``.half()`` and ``.cuda()`` move weights to new storage): wrapped as instance
  attributes, like fastcache's ``forward``, and restored by `close`; and the pipeline's own
  loaders that edit the U-Net's layers directly (``unfuse_lora``...), which fastcache's
  accelerated pipeline class reports with `note` (install.py);
* what can be changed on sub-modules directly, read at every call (`probe`): each attention
  module's processor object, its IP-Adapter scales and attention backend, FreeU's factors, each
  transformer block's chunking, and the storage, device and dtype of the input convolution's
  weight. A few dict reads per attention module: about 3 us for SD 1.5 and 10 us for SDXL.

Not seen: PEFT's functions called on single layers, and ``param.data = tensor`` on a weight other
than the first (torch has no hook for it; ``load_state_dict(assign=True)``, assigning a new
Parameter and ``.to()`` are seen). `FastCache.reset()`, and every U-Net call of a custom loop that
does not use it, take the full fingerprint, which sees those too.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable

import torch

from .patching import InstancePatch

# U-Net methods (diffusers 0.35-0.42) that change what the graphs compute without registering a
# sub-module, parameter or buffer. Methods a U-Net class lacks are skipped.
WATCHED_METHODS = (
    "set_adapters", "set_adapter", "add_adapter", "enable_adapters", "disable_adapters", "enable_lora",
    "disable_lora", "fuse_lora", "unfuse_lora", "unload_lora", "delete_adapters", "load_lora_adapter",
    "set_attn_processor", "set_default_attn_processor", "set_attention_backend", "reset_attention_backend",
    "enable_freeu", "disable_freeu", "fuse_qkv_projections", "unfuse_qkv_projections",
    "_load_ip_adapter_weights", "enable_layerwise_casting", "enable_group_offload", "_apply",
)


def _scale(value: Any) -> Any:
    """IP-Adapter processors keep their scales in a list that `set_ip_adapter_scale` edits in place."""
    return tuple(value) if isinstance(value, list) else value


class _RegistrationHooks:
    """torch's three global registration hooks, registered while any ModelWatch is open and shared
    by all of them: the hooks dict that compiled graphs guard on stays as it is while watches come
    and go, and graphs guard on nothing of a watch (the hook returns at once under dynamo)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: "weakref.WeakSet[ModelWatch]" = weakref.WeakSet()
        self._handles: list[Any] = []

    def add(self, watch: "ModelWatch") -> None:
        with self._lock:
            self._watches.add(watch)
            if not self._handles:
                hooks = torch.nn.modules.module
                self._handles = [
                    hooks.register_module_module_registration_hook(_on_registration),
                    hooks.register_module_parameter_registration_hook(_on_registration),
                    hooks.register_module_buffer_registration_hook(_on_registration),
                ]

    def discard(self, watch: "ModelWatch") -> None:
        """Forget `watch`; the last one out removes the hooks (torch's global state as it was)."""
        with self._lock:
            self._watches.discard(watch)
            if not self._watches:
                for handle in self._handles:
                    handle.remove()
                self._handles = []

    def watches(self) -> list["ModelWatch"]:
        with self._lock:
            return list(self._watches)


_HOOKS = _RegistrationHooks()


def _on_registration(module: torch.nn.Module, name: str, value: Any) -> None:
    if torch.compiler.is_compiling():  # a module registered inside a traced forward: no guards on watches
        return
    for watch in _HOOKS.watches():
        watch._registered(module, name, value)


class ModelWatch:
    """Counts the changes made to `unet` through the points above; `changed()` says whether the
    full fingerprint must be taken again. Call `accept()` once the handle has acted on a change."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.version = 0
        self._accepted_version = 0
        self._patches = [
            InstancePatch(unet, name, self._counting(getattr(unet, name)))
            for name in WATCHED_METHODS
            if callable(getattr(type(unet), name, None))
        ]
        for patch in self._patches:
            patch.apply()
        self._index()
        _HOOKS.add(self)
        self._last_probe = self.probe()

    # -- the tracked points --------------------------------------------------------------------
    def _counting(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            finally:  # a call that failed half-way may have changed something too
                self.version += 1

        return counted

    def _registered(self, module: torch.nn.Module, name: str, value: Any) -> None:
        if id(module) in self._module_ids:
            self.version += 1

    def _index(self) -> None:
        """The U-Net's modules now, and those the probe reads (rebuilt at every `accept`)."""
        modules = list(self.unet.modules())
        self._module_ids = {id(m) for m in modules}
        self._attention_dicts = [m.__dict__ for m in modules if "processor" in m.__dict__ or "processor" in m._modules]
        self._chunked = [m for m in modules if "_chunk_size" in m.__dict__]
        self._up_blocks = list(getattr(self.unet, "up_blocks", ()))
        self._weight = next(iter(self.unet.parameters()), None)

    def probe(self) -> tuple[Any, ...]:
        """What can change on sub-modules directly, as plain values to compare with the last."""
        processors = [d.get("processor") or d["_modules"].get("processor") for d in self._attention_dicts]
        weight = self._weight
        return (
            tuple(map(id, processors)),
            tuple(_scale(getattr(p, "scale", None)) for p in processors),
            tuple(getattr(p, "_attention_backend", None) for p in processors),
            tuple((m._chunk_size, m._chunk_dim) for m in self._chunked),
            tuple(tuple(b.__dict__.get(k) for k in ("s1", "s2", "b1", "b2")) for b in self._up_blocks),
            None if weight is None else (weight.data_ptr(), weight.device, weight.dtype),
        )

    def note(self) -> None:
        """Something changed the model through a tracked point outside the U-Net (a pipeline
        method of install.PIPELINE_WATCHED_METHODS)."""
        self.version += 1

    # -- the handle's side ---------------------------------------------------------------------
    def changed(self) -> bool:
        """Whether anything tracked moved since the last `accept()` (then take the fingerprint)."""
        return self.version != self._accepted_version or self.probe() != self._last_probe

    def accept(self) -> None:
        """The handle has seen the model as it is now: re-index its modules, start counting anew."""
        self._index()
        self._accepted_version = self.version
        self._last_probe = self.probe()

    def close(self) -> None:
        """Remove the hooks and restore the wrapped methods exactly."""
        _HOOKS.discard(self)  # idempotent: a second close changes nothing
        for patch in reversed(self._patches):
            patch.undo()
        self._patches = []
