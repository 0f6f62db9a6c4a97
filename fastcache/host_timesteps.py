"""The ``host_timesteps`` option: a pipeline call's timesteps on the CPU, as diffusers does on XLA.

diffusers' pipelines ask the scheduler for timesteps on the execution device and loop over them,
so each step's ``t`` is a 0-d device tensor. Schedulers then read it on the host: DDIM and PNDM
index ``alphas_cumprod[t]`` (ATen turns a 0-d integer index into ``.item()``, TensorIndexing.h)
and test ``prev_t >= 0`` in every step; Euler-type schedulers' first step runs
``(timesteps == t).nonzero()``; SDXL's ``denoising_end`` compares every timestep. Each is a GPU
sync, which keeps the host from queueing the next step while the GPU runs this one. diffusers' own
pipelines already run with CPU timesteps (they choose them on XLA for this reason), and
fastcache's U-Net calls take a CPU timestep without a sync (`runtime.StepInputs`).

During each call of an accelerated pipeline, ``scheduler.set_timesteps`` is an instance attribute
that calls the scheduler's own method with ``device="cpu"``; it is removed when the call ends.
The timesteps' values, and so the images, are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator

from .patching import InstancePatch


@contextlib.contextmanager
def timesteps_on_host(scheduler: Any) -> Iterator[None]:
    """Within the block, `scheduler.set_timesteps(..., device=anything)` puts them on the CPU."""
    original = scheduler.set_timesteps
    signature = inspect.signature(original)
    if "device" not in signature.parameters:  # this scheduler never moves its timesteps
        yield
        return

    @functools.wraps(original)  # keeps the signature: retrieve_timesteps inspects it
    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        bound.arguments["device"] = "cpu"
        return original(*bound.args, **bound.kwargs)

    patch = InstancePatch(scheduler, "set_timesteps", set_timesteps)
    patch.apply()
    try:
        yield
    finally:
        patch.undo()
