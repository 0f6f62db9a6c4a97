"""diffusers' U-Net call conventions, in one place: what a ``UNet2DConditionModel.forward`` call
passes, which of it fastcache handles, and how it becomes the normalised `StepInputs` that the
runners take and the `UNet2DConditionOutput` the pipeline expects back.

The runners (runtime.py, graphs.py) know `StepInputs` only as named tensors with a shape key; the
split (unet_split.py) reads the same names. Nothing here knows how a U-Net is split or run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import torch
from torch import Tensor

from .errors import InvalidInputError, UnsupportedInputError

# Inputs a split understands besides sample, timestep and text embeddings, passed in one mapping:
# SDXL's added conditions (``added_cond_kwargs``), LCM's ``timestep_cond``, and ControlNet's
# residuals (``down_residuals``: a tuple with one tensor per skip connection, ``mid_residual``),
# IP-Adapter image embeddings (``image_embeds``: a tuple with one tensor per adapter) and masks
# (``ip_adapter_masks``: a tuple with one tensor, or None for an unmasked adapter, per adapter).
ADDED_CONDITIONS = (
    "text_embeds", "time_ids", "timestep_cond", "down_residuals", "mid_residual", "image_embeds", "ip_adapter_masks",
)
# The ones that arrive in the U-Net call's ``added_cond_kwargs`` (the others have arguments of their own).
ADDED_COND_KWARGS = ("text_embeds", "time_ids", "image_embeds")
# The one kind of encoder_hid_proj a split supports: IP-Adapter's image projection, which turns
# the text context into a (text, [image tokens per adapter]) tuple for the attention processors.
IP_ADAPTER_PROJECTION = "ip_image_proj"
# The keys of a U-Net call's ``cross_attention_kwargs`` a split handles: LoRA's ``scale`` (applied
# through the LoRA scale buffer, lora.py) and IP-Adapter masks (an input, `ip_adapter_masks`).
CROSS_ATTENTION_KWARGS = ("scale", "ip_adapter_masks")


def ip_adapter_masks(masks: Any) -> tuple[Tensor | None, ...]:
    """``cross_attention_kwargs["ip_adapter_masks"]`` as one entry per adapter, as diffusers'
    IP-Adapter attention processors read it: a list as given (a ``(1, images, h, w)`` tensor, or
    None for an unmasked adapter, per adapter), or a ``(adapters, 1, h, w)`` tensor split into
    ``list(masks.unsqueeze(1))`` (their backward-compatible form).

    Raises ValueError, as the processors would, for an entry of another kind: checked here, before
    a graph is compiled with it, so that it is the same error in every runtime.
    """
    entries = tuple(masks.unsqueeze(1)) if torch.is_tensor(masks) else tuple(masks)
    for entry in entries:
        if entry is not None and not (torch.is_tensor(entry) and entry.ndim == 4):
            raise ValueError(
                "each entry of ip_adapter_masks must be None or a (1, images, height, width) tensor "
                f"(IPAdapterMaskProcessor.preprocess makes them); got {type(entry).__name__}"
                + (f" of shape {tuple(entry.shape)}" if torch.is_tensor(entry) else "")
            )
    return entries


def host_tensor(values: Any, device: torch.device) -> torch.Tensor:
    """`values` as a float32 host tensor that copies to `device` without a host-device sync.

    A copy from pageable host memory to a CUDA device waits for the stream to drain; one from
    pinned memory with ``non_blocking=True`` does not, and torch's pinned-memory allocator keeps
    the block alive until the copy has run, so the tensor may be dropped at once.
    """
    tensor = torch.tensor(values, dtype=torch.float32)
    return tensor.pin_memory() if device.type == "cuda" else tensor


def host_tensor_to(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` copied to `device`; from the CPU to a CUDA device through pinned memory with
    ``non_blocking=True``, so the copy does not wait for the GPU (see `host_tensor`)."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class StepInputs:
    """The tensors of one U-Net call, normalised so that equal shape keys trace the same graph.

    The timestep becomes a ``(batch,)`` float32 tensor on the sample's device (diffusers' time
    projection casts it to float32 anyway, so values are unchanged), built without a host-device
    sync: a device timestep stays on the device, a Python number or CPU tensor is written there
    from the host (never a pageable copy, which would wait for the GPU).
    """

    sample: Tensor
    timestep: Tensor
    encoder_hidden_states: Tensor
    added: dict[str, Any] = field(default_factory=dict)  # keys from ADDED_CONDITIONS

    @classmethod
    def from_unet_call(
        cls,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        added_cond_kwargs: Mapping[str, Tensor] | None = None,
        timestep_cond: Tensor | None = None,
        down_residuals: Sequence[Tensor] | None = None,
        mid_residual: Tensor | None = None,
        masks: Any = None,
    ) -> "StepInputs":
        """`masks`: ``cross_attention_kwargs["ip_adapter_masks"]``; masks on another device than
        the sample (diffusers leaves them on the CPU) are copied to it, from pinned memory."""
        batch, device = sample.shape[0], sample.device
        if torch.is_tensor(timestep) and timestep.device != device and timestep.device.type == "cpu":
            if timestep.numel() == 1:
                timestep = float(timestep)  # a host value: read on the host, filled on the device
            else:  # pinned, so that the copy does not wait for the GPU (host_tensor)
                timestep = host_tensor(timestep.reshape(-1).tolist(), device).to(device, non_blocking=True)
        if torch.is_tensor(timestep):
            timestep = timestep.to(device=device, dtype=torch.float32).reshape(-1).expand(batch).contiguous()
        else:
            timestep = torch.full((batch,), float(timestep), dtype=torch.float32, device=device)
        added = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in (added_cond_kwargs or {}).items()
            if value is not None
        }
        if timestep_cond is not None:
            added["timestep_cond"] = timestep_cond
        if down_residuals is not None:
            added["down_residuals"] = tuple(down_residuals)
        if mid_residual is not None:
            added["mid_residual"] = mid_residual
        if masks is not None:
            added["ip_adapter_masks"] = tuple(
                mask if mask is None or mask.device == device else host_tensor_to(mask, device)
                for mask in ip_adapter_masks(masks)
            )
        return cls(sample, timestep, encoder_hidden_states, added)

    def clone(self) -> "StepInputs":
        """Fresh copies of every tensor (static buffers for graph capture)."""

        def copy(value: Any) -> Any:
            return tuple(t if t is None else t.clone() for t in value) if isinstance(value, tuple) else value.clone()

        return StepInputs(
            self.sample.clone(), self.timestep.clone(), self.encoder_hidden_states.clone(),
            {name: copy(value) for name, value in self.added.items()},
        )

    def unconditional_half(self) -> "StepInputs":
        """The unconditional half of a classifier-free-guidance batch, which TGATE runs alone after
        its gate. diffusers puts it first (latents, embeddings, SDXL's pooled embeddings), except
        SDXL's time ids, which its pipeline lays out as ``[negative, positive]`` repeated per image:
        there the negative rows are the even ones (the first half mixes both once a prompt has more
        than one image and ``negative_original_size`` and the like differ from the positive sizes;
        the tgate package passes its negative ids alone)."""
        batch = self.sample.shape[0]
        if batch % 2:
            raise InvalidInputError(f"a classifier-free-guidance batch has an even size; this one has {batch}")

        def cut(value: Any, every_other: bool = False) -> Any:
            if isinstance(value, tuple):
                return tuple(cut(item) for item in value)
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
                return value[0::2].contiguous() if every_other else value[: batch // 2]
            return value

        added = {name: cut(value, every_other=name == "time_ids") for name, value in self.added.items()}
        return StepInputs(cut(self.sample), cut(self.timestep), cut(self.encoder_hidden_states), added)

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor by a flat name, in a fixed order (a None entry of a tuple, an unmasked
        IP-Adapter, has no name: the names present tell the shape keys apart)."""
        named = {
            "sample": self.sample,
            "timestep": self.timestep,
            "encoder_hidden_states": self.encoder_hidden_states,
        }
        for name in ADDED_CONDITIONS:
            value = self.added.get(name)
            if isinstance(value, tuple):
                named.update((f"{name}.{index}", tensor) for index, tensor in enumerate(value) if tensor is not None)
            elif value is not None:
                named[name] = value
        return named

    def key(self) -> Hashable:
        """What a compiled graph specialises on: the device, shapes and dtypes of every input, and
        autocast's dtype while it is on (a graph captured under autocast computes in its dtype; the
        same call outside it must not replay that graph)."""
        device = self.sample.device
        key = (str(device),) + tuple(
            (name, tuple(tensor.shape), tensor.dtype) for name, tensor in self.tensors().items()
        )
        autocast = autocast_dtype(device.type)
        if autocast is not None:
            key += ((AUTOCAST, (), autocast),)
        return key

    def args(self) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        return self.sample, self.timestep, self.encoder_hidden_states, self.added


AUTOCAST = "autocast"  # the key entry of autocast's dtype, beside the inputs' (name, shape, dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type`, or None where it is off (or has no autocast)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def check_call(
    sample: Any,
    encoder_hidden_states: Any,
    class_labels: Any = None,
    attention_mask: Any = None,
    cross_attention_kwargs: Mapping[str, Any] | None = None,
    added_cond_kwargs: Mapping[str, Any] | None = None,
    down_block_additional_residuals: Any = None,
    mid_block_additional_residual: Any = None,
    down_intrablock_additional_residuals: Any = None,
    encoder_attention_mask: Any = None,
) -> None:
    """Raise UnsupportedInputError for U-Net call arguments the split does not handle (yet)."""
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


def check_inputs(unet: Any, sample: Any, encoder_hidden_states: Tensor) -> None:
    """Refuse, before anything runs, inputs that cannot fit this U-Net (plain diffusers fails on
    them too, less clearly). Anything subtler is judged by running the eager split (the handle's shape runner)."""
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


def unet_output(noise: Tensor, return_dict: bool) -> Any:
    """What ``UNet2DConditionModel.forward`` returns for `noise`."""
    if not return_dict:
        return (noise,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=noise)
