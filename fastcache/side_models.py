"""The pipeline's other models under torch.compile: the VAE decoder and the text encoders.

Once cached steps are cheap, the work around the denoising loop shows: one VAE decode and one or
two text-encoder calls per image, hundreds of small kernels each when eager. With
``compile_vae`` / ``compile_text_encoders`` these run compiled (the U-Net graphs' backend, mode and
options; static shapes, so one graph per input shape; no graph breaks in diffusers 0.42.1 and
transformers 5), prepared by the same `warmup` call. They are not captured as CUDA Graphs.

Each is an instance attribute (``vae.decode``, ``text_encoder.forward``) removed by ``disable()``.
A failure while compiling a new shape is reported as a compile failure (the handle restores the
pipeline); a failure at a shape that already ran is the model's own and propagates unchanged.
"""

from __future__ import annotations

from typing import Any, Hashable

import torch

from .errors import InvalidConfigError
from .patching import InstancePatch
from .runtime import without_inference_tensors

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class CompileFailure(Exception):
    """Compiling a side model for a new input shape failed (the cause is chained)."""

    def __init__(self, where: str, error: BaseException) -> None:
        super().__init__(f"{where}: {type(error).__name__}: {error}")
        self.where = where


def _shape_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    def describe(value: Any) -> Any:
        if torch.is_tensor(value):
            return (tuple(value.shape), value.dtype, str(value.device))
        if isinstance(value, (tuple, list)):
            return tuple(describe(v) for v in value)
        return value if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__

    return describe(args), tuple(sorted((name, describe(value)) for name, value in kwargs.items()))


class CompiledMethod:
    """One model method replaced by its compiled self, remembering which input shapes ran."""

    def __init__(self, owner: Any, name: str, label: str, compile_options: dict[str, Any]) -> None:
        self.label = label
        self._compiled = torch.compile(getattr(owner, name), **compile_options)
        self.shapes: set[Hashable] = set()
        self.patch = InstancePatch(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = _shape_key(args, kwargs)
        # Inference mode off, inference-tensor inputs copied: one graph in and out of a caller's
        # torch.inference_mode (runtime.without_inference_tensors); grad mode stays the caller's.
        with torch.inference_mode(False):
            args, kwargs = without_inference_tensors((args, kwargs))
            if key in self.shapes:
                return self._compiled(*args, **kwargs)
            try:
                result = self._compiled(*args, **kwargs)
            except Exception as error:
                raise CompileFailure(f"compiling {self.label} for a new input shape", error) from error
        self.shapes.add(key)
        return result



class SideModels:
    """The compiled VAE decoder and/or text encoders of one pipeline."""

    def __init__(self, pipe: Any, vae: bool, text_encoders: bool, compile_options: dict[str, Any]) -> None:
        self.methods: list[CompiledMethod] = []
        if vae:
            if getattr(pipe, "vae", None) is None or not callable(getattr(pipe.vae, "decode", None)):
                raise InvalidConfigError("compile_vae=True needs a pipeline with a VAE (pipe.vae.decode)")
            self.methods.append(CompiledMethod(pipe.vae, "decode", "the VAE decoder", compile_options))
        if text_encoders:
            found = [name for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None]
            if not found:
                raise InvalidConfigError("compile_text_encoders=True needs a pipeline with a text encoder")
            self.methods += [
                CompiledMethod(getattr(pipe, name), "forward", name.replace("_", " "), compile_options)
                for name in found
            ]

    def install(self) -> None:
        for method in self.methods:
            method.patch.apply()

    def uninstall(self) -> None:
        for method in reversed(self.methods):
            method.patch.undo()

    @property
    def compiled_shapes(self) -> dict[str, int]:
        return {method.label: len(method.shapes) for method in self.methods}
