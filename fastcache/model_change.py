"""The U-Net a handle's graphs were built for, and what happens when it changes.

A change (LoRA loaded, fused, switched or deleted; processors, FreeU, chunking; weights given new
storage; the model moved to another device; ``pipe.unet`` replaced by another U-Net) makes the
graphs stale: a new runner prepares them again on first use. Whether anything changed is asked of
the model watch first (model_watch.py), so a call pays for the full fingerprint (lora.py) only
after a tracked change, or when a custom loop's ``reset()`` asks for it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import FastCacheConfig
from .dispatch import StepDispatcher
from .errors import FastCacheError, UnsupportedPipelineError
from .install import Installation, check_hooks, check_unet
from .lora import LoraScales, model_fingerprint
from .runtime import Split
from .shapes import RunnerFactory, ShapeRunner

logger = logging.getLogger("fastcache")

class ModelState:
    """The accelerated U-Net's device, LoRA scale buffer and fingerprint; rebuilds the runner
    when they no longer describe the model."""

    def __init__(self, install: Installation, shapes: ShapeRunner, config: FastCacheConfig,
                 make_runner: RunnerFactory, dispatcher: StepDispatcher, device: torch.device) -> None:
        self._install = install
        self._shapes = shapes
        self._config = config
        self._make_runner = make_runner
        self._dispatcher = dispatcher
        self._describe(device)

    def check(self, full: bool = False) -> None:
        """Prepare graphs again if the U-Net changed since they were built; the fingerprint is
        taken only when the watch saw a change, or when `full`."""
        watch = self._install.watch
        assert watch is not None
        if not full and not watch.changed():
            return
        unet = self._install.unet
        fingerprint = model_fingerprint(unet)
        watch.accept()
        if fingerprint == self.fingerprint:
            return
        check_hooks(unet, self._config)  # hooks change weights, so the fingerprint: checked here
        if unet.device != self.device:  # pipe.to(another device): new storage, new device
            logger.warning("the U-Net moved from %s to %s: fastcache prepares its graphs again there",
                           self.device, unet.device)
        else:
            logger.info("the U-Net's modules, adapters or weight storage changed since fastcache built its "
                        "graphs (load_lora_weights, fuse_lora, set_adapters with other adapters, ...): "
                        "preparing them again")
        self.rebuild(unet.device, self._shapes.split)

    def adopt(self, pipe: Any) -> None:
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
            split = check_unet(new, self._config)
        except FastCacheError as error:
            raise type(error)(
                f"this {type(pipe).__name__}'s unet was replaced after fastcache.accelerate, and the new one "
                f"cannot be accelerated: {error}. Put the previous U-Net back, or call disable() on the "
                "handle to run the new one without fastcache"
            ) from error
        logger.info("pipe.unet was replaced: fastcache accelerates the new U-Net and prepares its graphs again")
        self._install.replace_unet(new)
        self.rebuild(new.device, split)

    def rebuild(self, device: torch.device, split: Split) -> None:
        """A new runner (graphs compiled and captured again on first use) and LoRA scale buffer."""
        self._shapes.replace(self._make_runner(split, self._config, device), split)
        self._describe(device)
        self._dispatcher.rearm()

    def _describe(self, device: torch.device) -> None:
        """The device, LoRA scale buffer and fingerprint of the U-Net as it is now."""
        self.device = device
        self.lora = LoraScales(self._install.unet, device)
        self.fingerprint = model_fingerprint(self._install.unet)
