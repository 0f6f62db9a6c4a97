"""LoRA adapters (PEFT) on an accelerated U-Net: scales as device values, model changes detected.

PEFT keeps each LoRA layer's scale as a Python float, ``layer.scaling[adapter]``. A compiled graph
would bake that float in (every scale change would recompile) and a captured CUDA Graph would keep
replaying the old one. So while fastcache runs the U-Net, each of those entries is swapped for a
0-d view into one float32 device tensor (`LoraScales.buffer`) holding the scale of this call; the
graphs read the scales like any other input. Between U-Net calls PEFT sees its own floats, so
``set_adapters``, ``fuse_lora``, ``save_lora_weights``... work unchanged.

Everything else a LoRA API call can change alters *what* runs (load/unload/delete adapters,
fuse/unfuse, enable/disable, another set of active adapters) or *where the weights live* (new
storage): `model_fingerprint` changes, and the handle prepares its graphs again.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .runtime import host_tensor


def is_lora_layer(module: Any) -> bool:
    """A PEFT tuner layer with per-adapter scales (LoRA's Linear/Conv2d wrappers)."""
    # Read from the instance dict: ``getattr`` on a Module that lacks the attribute goes through
    # ``Module.__getattr__`` and an exception, which is most of a fingerprint's cost.
    scaling = module.__dict__.get("scaling")
    return isinstance(scaling, dict) and "lora_A" in module._modules and hasattr(module, "active_adapters")


def lora_layers(model: torch.nn.Module) -> list[Any]:
    return [module for module in model.modules() if is_lora_layer(module)]


# Plain attributes that diffusers' forward code reads and its APIs change at run time. A captured
# graph bakes their values in, so a change must re-prepare the graphs: FreeU's factors on up blocks
# (enable_freeu / disable_freeu) and feed-forward chunking on transformer blocks
# (set_chunk_feed_forward). Keyed by an attribute only those blocks have, so that every other
# module costs one dict lookup per key.
FORWARD_SETTINGS = {"s1": ("s1", "s2", "b1", "b2"), "_chunk_size": ("_chunk_size", "_chunk_dim")}


def model_fingerprint(model: torch.nn.Module) -> int:
    """What compiled and captured graphs of `model` depend on besides input shapes.

    The identity of every sub-module (adapters loaded, unloaded or deleted replace modules) and
    attention processor and its backend, IP-Adapter image scales (baked into graphs as
    constants), each LoRA layer's active/merged/disabled adapters (fuse, unfuse, set_adapters with
    other names, enable/disable_lora), the `FORWARD_SETTINGS` of the blocks that have them (FreeU,
    forward chunking), and the storage of every parameter and buffer (CUDA Graphs replay fixed
    addresses; weights copied in place keep them, new tensors do not).

    One pass over the modules per pipeline call (and per `reset()` of a custom loop), so it walks
    ``_modules`` directly: ``Module.modules()`` builds every module's dotted name on the way.
    """
    parts: list[Any] = []
    append = parts.append
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:  # a module shared in two places counts once, as in modules()
            continue
        seen.add(id(module))
        state = module.__dict__
        children = state["_modules"]
        append(id(module))
        for marker, names in FORWARD_SETTINGS.items():
            if marker in state:
                append(tuple(map(state.get, names)))
        for tensors in (state["_parameters"], state["_buffers"]):
            for tensor in tensors.values():
                if tensor is not None:
                    append(tensor.data_ptr())
        # Attention processors are plain objects or, IP-Adapter's, sub-modules (set_attn_processor
        # and load_ip_adapter swap them); IP-Adapter's keep image scales as floats (set_ip_adapter_scale),
        # and set_attention_backend changes a dispatching processor's backend in place.
        processor = state.get("processor") or children.get("processor")
        if processor is not None:
            append((id(processor), repr(getattr(processor, "scale", None)), getattr(processor, "_attention_backend", None)))
        if "scaling" in state and is_lora_layer(module):
            append((tuple(module.active_adapters), tuple(module.merged_adapters), bool(module.disable_adapters)))
        stack.extend(child for child in reversed(children.values()) if child is not None)
    return hash(tuple(parts))


class LoraScales:
    """The LoRA scales of one U-Net as a device tensor, installed into PEFT only during runs.

    Built again whenever `model_fingerprint` changes, so its list of (layer, adapter) entries is
    always the model's current one.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.layers = lora_layers(model)
        self.entries = [(layer, adapter) for layer in self.layers for adapter in layer.scaling]
        with torch.inference_mode(False):  # written at every run, in or out of inference mode
            self.buffer = torch.zeros(len(self.entries), dtype=torch.float32, device=device)
        self._views = list(self.buffer.unbind(0))
        self._uploaded: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @contextlib.contextmanager
    def applied(self, lora_scale: float = 1.0) -> Iterator[None]:
        """PEFT's scales times `lora_scale` (``cross_attention_kwargs["scale"]``) in the buffer,
        and the buffer's views in PEFT's dicts, for the duration of one U-Net run.

        The upload is one asynchronous host-to-device copy, done only when a value changed since
        the last run: it never waits for the GPU.
        """
        if not self.entries:
            yield
            return
        own = [layer.scaling[adapter] for layer, adapter in self.entries]
        values = tuple(float(value) * lora_scale for value in own)
        if values != self._uploaded:
            self.buffer.copy_(host_tensor(values, self.buffer.device), non_blocking=True)
            self._uploaded = values
        for (layer, adapter), view in zip(self.entries, self._views):
            layer.scaling[adapter] = view
        try:
            yield
        finally:
            for (layer, adapter), value in zip(self.entries, own):
                layer.scaling[adapter] = value
        if lora_scale == 0:
            # diffusers' unscale_lora_layers(model, 0) resets active adapters to their initial
            # scale after a scale-0 call; an accelerated pipeline behaves as the plain one.
            for layer in self.layers:
                for adapter in layer.active_adapters:
                    layer.set_scale(adapter, 1.0)
