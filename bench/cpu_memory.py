"""Peak CPU tensor memory of one call, for issue 5's memory comparison on a machine without a GPU.

torch's caching allocator statistics (`max_memory_allocated`) exist for CUDA only, and a process
RSS would mix in the compiler, the interpreter and freed-but-kept malloc arenas. Two exact pieces
add up to what CUDA's peak *allocated* counts instead:

* **resident**: the bytes of every CPU tensor storage alive before the call (weights, fastcache's
  static buffers and kept features, DeepCache's kept features, the inputs), found by walking the
  garbage collector's objects and counting each storage once;
* **during the call**: the highest running sum of the allocations and frees the profiler's memory
  events report (`profile_memory=True`; inductor's generated code allocates through the same CPU
  allocator, so compiled buffers count). The profiler only sees frees of blocks allocated while it
  runs, so this is the call's own working set on top of what was resident.

The profiler slows the call, so this runs on an extra, untimed call.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class CallMemory:
    resident_bytes: int  # live CPU tensor storages when the call started
    peak_during_bytes: int  # highest live total of the call's own allocations

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.peak_during_bytes


def resident_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of all tensors the garbage collector can reach."""
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # not isinstance: that reads lazy modules' __class__
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested and other storage-less tensors
            continue
        # Fake and meta tensors (dynamo keeps some in its guards and graphs) report device cpu but
        # own no memory: their storage lives on the meta device.
        if storage.device.type != "cpu" or storage.data_ptr() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def peak_allocated_during(function: Callable[[], Any]) -> tuple[int, Any]:
    """(highest live bytes allocated by `function` at any moment, its result), from profiler events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = function()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type()
              == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak, result


def call_memory(function: Callable[[], Any]) -> CallMemory:
    """Resident CPU tensor bytes before `function`, and its own peak on top (one untimed call)."""
    gc.collect()
    resident = resident_tensor_bytes()
    during, _ = peak_allocated_during(function)
    return CallMemory(resident, during)
