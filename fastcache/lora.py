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

from .unet_call import host_tensor


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

    A scale is a Python number, or a tensor: PEFT's ``prepare_model_for_compiled_hotswap`` keeps
    each adapter's scale as a device tensor (so that hot-swapping does not recompile), and a
    call's ``cross_attention_kwargs["scale"]`` may be one. A tensor on the buffer's device is
    copied on the device, never read on the host (that would wait for the GPU at every U-Net
    call); one on the CPU for a GPU buffer is read on the host, which costs no sync.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.layers = lora_layers(model)
        self.entries = [(layer, adapter) for layer in self.layers for adapter in layer.scaling]
        with torch.inference_mode(False):  # written at every run, in or out of inference mode
            self.buffer = torch.zeros(len(self.entries), dtype=torch.float32, device=device)
            # PEFT's own scales, before the call's scale multiplies them (device-tensor scales only)
            self._base = torch.zeros(len(self.entries), dtype=torch.float32, device=device)
        self._views = list(self.buffer.unbind(0))
        self._base_views = list(self._base.unbind(0))
        self._uploaded: tuple[float, ...] | None = None
        self._base_uploaded: tuple[float, ...] | None = None
        # CUDA: recorded on the caller's stream after each run, which read the buffer; the next
        # run's writes wait for it, whichever stream they are queued on.
        self._last_run: Any = None

    @contextlib.contextmanager
    def applied(self, lora_scale: float | torch.Tensor = 1.0) -> Iterator[None]:
        """PEFT's scales times `lora_scale` (``cross_attention_kwargs["scale"]``) in the buffer,
        and the buffer's views in PEFT's dicts, for the duration of one U-Net run.

        With scales that are host values the upload is one asynchronous host-to-device copy, done
        only when a value changed since the last run; device-tensor scales are copied and
        multiplied on the device at every run. Neither waits for the GPU.
        """
        if not self.entries:
            yield
            return
        own = [layer.scaling[adapter] for layer, adapter in self.entries]
        self._wait_for_last_run()
        self._write(own, lora_scale)
        for (layer, adapter), view in zip(self.entries, self._views):
            layer.scaling[adapter] = view
        try:
            yield
        finally:
            for (layer, adapter), value in zip(self.entries, own):
                layer.scaling[adapter] = value
            self._record_run()
        if self._on_host(lora_scale) and float(lora_scale) == 0:
            # diffusers' unscale_lora_layers(model, 0) resets active adapters to their initial
            # scale after a scale-0 call; an accelerated pipeline behaves as the plain one. (Not
            # for a device-tensor scale: telling 0 apart would wait for the GPU.)
            for layer in self.layers:
                for adapter in layer.active_adapters:
                    layer.set_scale(adapter, 1.0)

    def _on_host(self, value: Any) -> bool:
        """Whether `value` is read on the host: a number, or a CPU tensor for a GPU buffer."""
        return not torch.is_tensor(value) or (value.device.type == "cpu" and self.buffer.device.type != "cpu")

    def _write(self, own: list[Any], lora_scale: float | torch.Tensor) -> None:
        on_device = [index for index, value in enumerate(own) if not self._on_host(value)]
        if not on_device and self._on_host(lora_scale):
            scale = float(lora_scale)
            values = tuple(float(value) * scale for value in own)
            if values != self._uploaded:
                self.buffer.copy_(host_tensor(values, self.buffer.device), non_blocking=True)
                self._uploaded = values
            return
        # Host values go into `_base` as above; device tensors are copied in on the device (one
        # fused copy), and the call's scale multiplies them all into the buffer.
        host = tuple(0.0 if index in on_device else float(value) for index, value in enumerate(own))
        if host != self._base_uploaded:
            self._base.copy_(host_tensor(host, self._base.device), non_blocking=True)
            self._base_uploaded = host
        if on_device:
            torch._foreach_copy_([self._base_views[index] for index in on_device], [own[index] for index in on_device])
        scale = float(lora_scale) if self._on_host(lora_scale) else lora_scale
        torch.mul(self._base, scale, out=self.buffer)
        self._uploaded = None  # the buffer no longer holds the last host upload

    def _wait_for_last_run(self) -> None:
        if self._last_run is not None:
            torch.cuda.current_stream(self.buffer.device).wait_event(self._last_run)

    def _record_run(self) -> None:
        if self.buffer.device.type != "cuda":
            return
        if self._last_run is None:
            self._last_run = torch.cuda.Event()
        self._last_run.record(torch.cuda.current_stream(self.buffer.device))
