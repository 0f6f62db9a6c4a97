"""ControlNet reuse: on cached steps, skip the ControlNet and replay its refresh-step residuals.

A ControlNet pipeline runs ``pipe.controlnet`` (a copy of the U-Net's encoder and mid block) before
every U-Net call and adds its residuals to the U-Net's skip connections and mid block. fastcache's
cached steps run only the U-Net's shallow branch, but the ControlNet still runs in full; with
``controlnet_reuse=True`` it runs only on refresh steps, and cached steps get the residuals of the
latest refresh step of the same pipeline call. That is an approximation beyond DeepCache's (the
control signal of the live shallow skips is held for the cache interval), so it is off by default.

One thing changes on the pipeline: ``pipe.controlnet.forward`` (an instance attribute; the class,
the sub-modules and MultiControlNet's nets are untouched), restored exactly by `uninstall`.

How a step is decided. The ControlNet is called before the U-Net, so the wrapper asks the
dispatcher what the coming U-Net call will be (`StepDispatcher.peek`, the same rule as
`next_call`, without changing anything) and replays only when all of these hold:

* the dispatcher predicts a cached call (at the U-Net shape key of the stored refresh);
* residuals from a refresh are stored: the latest U-Net refresh was fed by a ControlNet run,
  which this wrapper saw (every refresh replaces or drops them; a new pipeline call starts with a
  refresh, so nothing crosses pipeline calls);
* the call differs from that refresh step's ControlNet call only in ``sample`` values and
  ``timestep``: the same ``conditioning_scale`` (so ``control_guidance_start/end``, which set it
  to 0 outside their range, run the ControlNet until the next refresh at the new scale), the same
  ``guess_mode`` and flags, the same tensors for the prompt embeddings, control images and added
  conditions (same storage, offset, shape, strides and in-place version counter; a callback that
  replaces or edits them makes the ControlNet run), and the same ``sample`` shape, dtype, device.

Anything the wrapper cannot compare (an unknown object as an argument) runs the ControlNet.

Safety net: should the U-Net call after a replay be a refresh after all (peek and next_call see
the same scheduler state and the diffusers pipelines do not touch it in between, so this needs a
custom loop that changes shapes between the ControlNet and the U-Net call), `unet_call` runs the
ControlNet then with the arguments it was given, and puts the fresh residuals in place of the
replayed ones (passed through unchanged, or concatenated after zeros as ``guess_mode`` with
classifier-free guidance does); any other use raises instead of giving a wrong image.

Ownership: the stored residuals are detached clones made at the refresh (the ControlNet's own
outputs are never kept past the step). A replay returns those same tensors, so callers must not
edit them in place (the diffusers pipelines do not: they pass them on or concatenate them).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import Tensor

from .errors import InvalidConfigError, UnsupportedInputError
from .patching import InstancePatch
from .unet_call import StepInputs

logger = logging.getLogger("fastcache")

# Arguments that may change between a refresh and the cached steps that replay it.
_PER_STEP = ("timestep",)
_SHAPE_ONLY = ("sample",)


class _NotComparable(Exception):
    """An argument whose equality the wrapper cannot judge on the host: run the ControlNet."""


def _tensor_identity(tensor: Tensor) -> tuple[Any, ...]:
    """Host-side identity of a tensor's contents: same storage, view, and no in-place edit since.

    Inference-mode tensors have no version counter (they cannot be edited outside inference mode);
    their identity is storage and view only.
    """
    try:
        version = tensor._version
    except RuntimeError:
        version = None
    return (
        "tensor", tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
        tensor.stride(), tensor.dtype, str(tensor.device), version,
    )


def _fingerprint(value: Any, refs: list[Tensor]) -> Hashable:
    """A comparable summary of one argument; tensors it names are appended to `refs` (kept alive,
    so that a storage address cannot be reused by another tensor while the fingerprint is stored)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if torch.is_tensor(value):
        refs.append(value)
        return _tensor_identity(value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_fingerprint(item, refs) for item in value))
    if isinstance(value, dict):
        if not all(isinstance(name, str) for name in value):
            raise _NotComparable
        return ("dict", tuple((name, _fingerprint(value[name], refs)) for name in sorted(value)))
    raise _NotComparable


def _split_output(output: Any) -> tuple[tuple[Tensor, ...], Tensor, Callable[[tuple[Tensor, ...], Tensor], Any]] | None:
    """(down residuals, mid residual, rebuild) of a ControlNet output; None if not recognised.

    ``rebuild(down, mid)`` makes a new output of the same form (tuple or ControlNetOutput, list or
    tuple of down residuals) around the given tensors.
    """
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], (list, tuple)):
        down, mid = output
        container = type(down)
        rebuild: Callable[[tuple[Tensor, ...], Tensor], Any] = lambda d, m: (container(d), m)
    elif hasattr(output, "down_block_res_samples") and hasattr(output, "mid_block_res_sample"):
        down, mid = output.down_block_res_samples, output.mid_block_res_sample
        output_class, container = type(output), type(down)
        rebuild = lambda d, m: output_class(down_block_res_samples=container(d), mid_block_res_sample=m)
    else:
        return None
    if not torch.is_tensor(mid) or not all(torch.is_tensor(t) for t in down):
        return None
    return tuple(down), mid, rebuild


@dataclass
class _Stored:
    """Residuals of the latest refresh step, and what identifies that step's ControlNet call."""

    fingerprint: Hashable
    refs: list[Tensor]
    down: tuple[Tensor, ...]
    mid: Tensor
    rebuild: Callable[[tuple[Tensor, ...], Tensor], Any]
    unet_key: Hashable


@dataclass
class _Pending:
    """The ControlNet call of the current step, until its U-Net call consumes it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    fingerprint: Hashable | None
    refs: list[Tensor]
    output: Any = None  # the ControlNet ran: its output
    replayed: _Stored | None = None  # the ControlNet was skipped: what was replayed


def _supported_types() -> tuple[type, ...]:
    from diffusers import ControlNetModel, MultiControlNetModel

    return (ControlNetModel, MultiControlNetModel)


class ControlNetReuse:
    """Wraps ``pipe.controlnet.forward`` to replay refresh-step residuals on cached steps.

    Construction validates and changes nothing; `install` and `uninstall` patch and restore.
    `dispatcher` is the handle's `StepDispatcher`; the accelerated U-Net forward calls `unet_call`
    with each decision before it runs.
    """

    def __init__(self, pipe: Any, dispatcher: Any) -> None:
        controlnet = getattr(pipe, "controlnet", None)
        supported = _supported_types()
        if not isinstance(controlnet, supported):
            found = "has no `controlnet`" if controlnet is None else f"has a {type(controlnet).__name__} as `controlnet`"
            raise InvalidConfigError(
                f"controlnet_reuse=True needs a ControlNet pipeline, but this {type(pipe).__name__} {found}. "
                f"It is allowed with pipe.controlnet a {' or '.join(t.__name__ for t in supported)} "
                "(StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline, a list of "
                "ControlNets); leave controlnet_reuse=False otherwise"
            )
        self.pipe = pipe
        self.controlnet = controlnet
        self._dispatcher = dispatcher
        self._patch = InstancePatch(controlnet, "forward", self._forward)
        self._run_controlnet = controlnet.forward  # what runs it: the class's forward or that attribute
        # Arguments are named by the class's forward (a wrapper's may be just *args, **kwargs).
        self._signature = inspect.signature(type(controlnet).forward.__get__(controlnet))
        self._stored: _Stored | None = None
        self._pending: _Pending | None = None
        self.runs = 0  # ControlNet runs (including safety-net runs)
        self.replays = 0  # calls answered with stored residuals

    # -- install / restore -----------------------------------------------------------------------
    def install(self) -> None:
        self._patch.apply()

    def uninstall(self) -> None:
        """Restore ``controlnet.forward`` exactly and drop stored residuals."""
        self._patch.undo()
        self._stored = None
        self._pending = None

    # -- the two hooks ---------------------------------------------------------------------------
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """Replaces ``pipe.controlnet.forward``: same signature and return type."""
        fingerprint, refs = self._call_fingerprint(args, kwargs)
        stored = self._stored
        if (
            stored is not None
            and fingerprint is not None
            and fingerprint == stored.fingerprint
            and not self._dispatcher.peek(self.pipe.scheduler, stored.unet_key)
        ):
            self._pending = _Pending(args, kwargs, fingerprint, refs, replayed=stored)
            self.replays += 1
            return stored.rebuild(stored.down, stored.mid)
        output = self._run_controlnet(*args, **kwargs)
        self.runs += 1
        self._pending = _Pending(args, kwargs, fingerprint, refs, output=output)
        return output

    def unet_call(self, refresh: bool, unet_key: Hashable, inputs: StepInputs) -> StepInputs:
        """Called by the U-Net forward with its decision, before it runs; returns its inputs.

        A refresh stores the residuals of the ControlNet run before it (or drops the stored ones
        when there was none); a refresh after a replay runs the ControlNet now (safety net) and
        gets the fresh residuals in its inputs.
        """
        pending, self._pending = self._pending, None
        if not refresh:
            return inputs
        if pending is None:
            self._stored = None
            return inputs
        if pending.replayed is not None:
            logger.warning(
                "controlnet_reuse: the ControlNet was skipped for a U-Net call that turned out to be a "
                "refresh (its input shapes changed after the ControlNet call); running the ControlNet "
                "now so that the refresh gets fresh residuals"
            )
            pending.output = self._run_controlnet(*pending.args, **pending.kwargs)
            self.runs += 1
            down, mid = self._substitute(pending, inputs.added.get("down_residuals"), inputs.added.get("mid_residual"))
            inputs = dataclasses.replace(inputs, added={**inputs.added, "down_residuals": down, "mid_residual": mid})
        self._store(pending, unet_key)
        return inputs

    # -- internals -------------------------------------------------------------------------------
    def _call_fingerprint(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Hashable | None, list[Tensor]]:
        """The call's arguments but the per-step ones, comparable on the host; None: not comparable."""
        refs: list[Tensor] = []
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError:
            return None, refs
        parts = []
        try:
            for name, value in bound.arguments.items():
                if name in _PER_STEP:
                    continue
                if name in _SHAPE_ONLY and torch.is_tensor(value):
                    parts.append((name, ("shape", tuple(value.shape), value.dtype, str(value.device))))
                else:
                    parts.append((name, _fingerprint(value, refs)))
        except _NotComparable:
            return None, []
        return tuple(parts), refs

    def _store(self, pending: _Pending, unet_key: Hashable) -> None:
        split = _split_output(pending.output) if pending.fingerprint is not None else None
        if split is None:
            self._stored = None
            return
        down, mid, rebuild = split
        self._stored = _Stored(
            fingerprint=pending.fingerprint,
            refs=pending.refs,
            down=tuple(t.detach().clone() for t in down),
            mid=mid.detach().clone(),
            rebuild=rebuild,
            unet_key=unet_key,
        )

    def _substitute(self, pending: _Pending, down: Sequence[Tensor] | None, mid: Tensor | None
                    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """The U-Net's residuals with the fresh ControlNet output in place of the replayed one."""
        replayed = pending.replayed
        split = _split_output(pending.output)
        assert replayed is not None and split is not None
        fresh_down, fresh_mid, _ = split
        bound = self._signature.bind(*pending.args, **pending.kwargs)
        guess_mode = bound.arguments.get("guess_mode", False) is True

        def swap(given: Tensor, old: Tensor, new: Tensor) -> Tensor:
            if given is old:
                return new
            if guess_mode and given.shape[0] == 2 * old.shape[0] and given.shape[1:] == old.shape[1:]:
                return torch.cat([torch.zeros_like(new), new])  # the pipelines' guess-mode CFG batch
            raise UnsupportedInputError(
                "controlnet_reuse: a U-Net refresh followed a skipped ControlNet call and its residuals "
                "are not the replayed ones (passed on, or after zeros in guess mode), so fresh ones "
                "cannot be put in their place. Accelerate with controlnet_reuse=False for this loop."
            )

        if down is None or mid is None or len(down) != len(replayed.down):
            raise UnsupportedInputError(
                "controlnet_reuse: a U-Net refresh followed a skipped ControlNet call but did not receive "
                "its residuals. Accelerate with controlnet_reuse=False for this loop."
            )
        new_down = tuple(swap(g, o, n) for g, o, n in zip(down, replayed.down, fresh_down))
        return new_down, swap(mid, replayed.mid, fresh_mid)
