"""Peak CPU tensor memory of one call, for issue 5's memory comparison on a machine without a GPU.

torch's caching allocator statistics (`max_memory_allocated`) exist for CUDA only, and a process
RSS would mix in the compiler, the interpreter and freed-but-kept malloc arenas. Two exact pieces
add up to what CUDA's peak *allocated* counts instead:

* **resident**: the bytes of every CPU tensor storage alive when the call starts (weights,
  fastcache's static buffers and kept features, DeepCache's kept features, the inputs), found by
  walking the garbage collector's objects and counting each storage once;
* **during the call**: the highest running sum of the allocations and frees the profiler's memory
  events report (`profile_memory=True`; inductor's generated code allocates through the same CPU
  allocator, so compiled buffers count).

The profiler reports no free of a block allocated before it started, so a call that replaces
state kept from the previous call (DeepCache keeps every module's output until the next step)
would be counted twice. The function therefore runs twice under one profiler: the first call makes
everything the second one frees a block the profiler has seen; the peak is read over the second.
That is exact as long as a call frees nothing older than the call before it, which holds for every
method measured here. The profiler slows the calls, so these are extra, untimed calls.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from fastcache.runtime import tensor_bytes

_MEASURED = "bench.cpu_memory.measured_call"


@dataclass(frozen=True)
class CallMemory:
    resident_bytes: int  # live CPU tensor storages when the measured call started
    peak_during_bytes: int  # highest live total of that call's own allocations, above resident

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.peak_during_bytes


def resident_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of all tensors the garbage collector can reach."""
    return tensor_bytes(_tensors_owning_cpu_memory(gc.get_objects()))


def _tensors_owning_cpu_memory(objects: Iterable[object]) -> Iterator[torch.Tensor]:
    for obj in objects:
        if not issubclass(type(obj), torch.Tensor):  # not isinstance: that reads lazy modules' __class__
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested and other storage-less tensors
            continue
        # Fake and meta tensors (dynamo keeps some in its guards and graphs) report device cpu but
        # own no memory: their storage lives on the meta device.
        if storage.device.type == "cpu" and storage.data_ptr() != 0:
            yield obj


def call_memory(function: Callable[[], Any]) -> CallMemory:
    """Resident CPU tensor bytes when `function` starts, and its own peak on top (module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()  # its allocations are the ones the measured call may free
        gc.collect()
        resident = resident_tensor_bytes()
        with record_function(_MEASURED):
            function()
    events = prof.profiler.kineto_results.events()
    (window,) = [e for e in events if e.name() == _MEASURED]
    memory = sorted((e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = peak = base = 0
    for event in memory:
        if event.start_ns() > window.end_ns():
            break
        live += event.nbytes()
        if event.start_ns() < window.start_ns():
            base = peak = live  # the level the measured call starts from
        else:
            peak = max(peak, live)
    return CallMemory(resident, max(0, peak - base))
