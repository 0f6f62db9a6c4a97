"""No host-device synchronisation in fastcache's U-Net calls.

A U-Net step that makes the host wait for the GPU cannot overlap the launch of the next step with
the current one; DeepCache's helper does that on every call (``timestep.item()``).

* CPU: no accelerated U-Net call reads a tensor value on the host. Such a read dispatches to
  ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``), which a dispatch
  mode counts; the same counter sees DeepCache's reads, so the check can fail. It does not see
  device-to-host copies (every tensor is on the CPU here): the CUDA test below does.
* CUDA: ``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising CUDA call (a
  pageable host-to-device copy, ``.item()``, ``.cpu()``, stream syncs) into an error during
  replayed steps, including a LoRA-style scale upload and a CPU timestep.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastcache.host_timesteps import timesteps_on_host
from fastcache.unet_call import StepInputs
from fastcache.tiny import tiny_sd_pipeline

from .helpers import accelerated, deepcache_latents, latents


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (what `.item()` and friends dispatch to)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads_in_unet_calls(unet: torch.nn.Module) -> Iterator[HostReads]:
    """Counts host reads inside every call of ``unet.forward`` as it is now (fastcache's or
    DeepCache's instance attribute), and puts that attribute back afterwards."""
    forward = unet.forward
    reads = HostReads()

    def counted(*args: Any, **kwargs: Any) -> Any:
        with reads:
            return forward(*args, **kwargs)

    unet.forward = counted
    try:
        yield reads
    finally:
        unet.forward = forward


@pytest.mark.parametrize("options", [dict(compile=False), dict(compile=False, emulate_graphs=True)],
                         ids=["eager-split", "emulated-graphs"])
def test_accelerated_unet_calls_read_no_tensor_on_the_host(sd_pipe, options):
    with accelerated(sd_pipe, cache_interval=3, **options) as handle:
        with host_reads_in_unet_calls(sd_pipe.unet) as reads:
            latents(sd_pipe)
        assert handle.stats.last_call.count(False) > 0, "the call ran no cached step"
        assert reads.count == 0, f"{reads.count} host reads of tensor values in fastcache's U-Net calls"


def test_the_counter_sees_deepcache_reading_the_timestep(sd_pipe):
    """The positive control: DeepCache's helper calls timestep.item() in every U-Net call."""
    from DeepCache import DeepCacheSDHelper

    from bench.methods import _drop_instance_forwards

    helper = DeepCacheSDHelper(pipe=sd_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        with host_reads_in_unet_calls(sd_pipe.unet) as reads:
            latents(sd_pipe, steps=4)
    finally:
        helper.disable()
        _drop_instance_forwards(sd_pipe.unet)  # DeepCache leaves bound forwards as attributes
    assert reads.count >= 4


def test_timesteps_from_the_host_need_no_device_read():
    """A Python number or a CPU timestep for a device sample is written on the device from host
    values; the values equal the plain conversion (float32, broadcast to the batch)."""
    sample = torch.zeros(3, 4, 8, 8)
    for timestep in (981, 981.5, torch.tensor(981), torch.tensor([981, 981, 981])):
        with HostReads() as reads:
            inputs = StepInputs.from_unet_call(sample, timestep, torch.zeros(3, 77, 32))
        expected = torch.full((3,), float(torch.as_tensor(timestep).reshape(-1)[0]), dtype=torch.float32)
        assert torch.equal(inputs.timestep, expected), timestep
        assert reads.count == 0


def test_timesteps_on_host_puts_them_on_the_cpu_and_restores_the_scheduler():
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    expected = scheduler.timesteps.clone()
    with timesteps_on_host(scheduler):
        assert "sigmas" in inspect.signature(scheduler.set_timesteps).parameters  # retrieve_timesteps reads it
        scheduler.set_timesteps(10, device="meta")  # where a pipeline would ask for its device
        assert scheduler.timesteps.device.type == "cpu" and torch.equal(scheduler.timesteps, expected)
        scheduler.set_timesteps(10, "meta")  # positionally too
        assert scheduler.timesteps.device.type == "cpu"
    assert "set_timesteps" not in vars(scheduler)
    with pytest.raises(KeyError), timesteps_on_host(scheduler):
        raise KeyError("a failing pipeline call")
    assert "set_timesteps" not in vars(scheduler)


@pytest.mark.covers(check="= DeepCache")
@pytest.mark.covers("host_timesteps=True (timesteps kept on the host)")
def test_host_timesteps_give_the_same_images_and_leave_the_scheduler_as_it_was(any_pipe):
    seen: list[tuple[bool, str]] = []

    def record(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        seen.append(("set_timesteps" in vars(pipe.scheduler), pipe.scheduler.timesteps.device.type))
        return kwargs

    expected = deepcache_latents(any_pipe, 3, 0)
    with accelerated(any_pipe, cache_interval=3, compile=False, host_timesteps=True):
        actual = latents(any_pipe, callback_on_step_end=record)
    assert torch.equal(actual, expected)
    assert seen and set(seen) == {(True, "cpu")}, "set during the call, timesteps on the CPU"
    assert "set_timesteps" not in vars(any_pipe.scheduler)


# -- CUDA --------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
@torch.no_grad()
def test_cuda_steps_never_synchronise():
    pipe = tiny_sd_pipeline(device="cuda", dtype=torch.float16)
    with accelerated(pipe, cache_interval=3) as handle:
        handle.warmup()
        sample = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
        context = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)
        timesteps = (torch.tensor(900, device="cuda"), 800, torch.tensor(700))  # device, int, CPU tensor
        handle.reset()
        before = (handle.stats.refresh_steps, handle.stats.cached_steps)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(6):
                pipe.unet(sample, timesteps[step % 3], context)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ran = (handle.stats.refresh_steps - before[0], handle.stats.cached_steps - before[1])
        assert ran == (2, 4), f"(refresh, cached) steps: {ran}"


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
@torch.no_grad()
def test_cuda_lora_scales_that_are_device_tensors_never_synchronise():
    """PEFT's compiled hot-swap keeps LoRA scales as device tensors, and a call's scale may be
    one: reading either on the host (float()) would wait for the GPU at every U-Net call."""
    from .test_lora import LORA_A, scales_as_tensors

    pipe = tiny_sd_pipeline(device="cuda", dtype=torch.float16)
    pipe.load_lora_weights(LORA_A, adapter_name="a")
    tensors = scales_as_tensors(pipe.unet)
    assert tensors and all(tensor.is_cuda for tensor in tensors)
    with accelerated(pipe, cache_interval=3) as handle:
        handle.warmup()
        sample = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
        context = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)
        scales = [torch.tensor(value, device="cuda") for value in (0.5, 0.8, 1.0)]
        handle.reset()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(6):
                torch._foreach_mul_(tensors, 1.01)  # hot-swap style: the scales change in place
                pipe.unet(sample, 900 - 100 * step, context, cross_attention_kwargs={"scale": scales[step % 3]})
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert handle._runner.captures == 2


@cuda
@torch.no_grad()
def test_cuda_scale_uploads_never_synchronise():
    from fastcache.unet_call import host_tensor

    buffer = torch.zeros(3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for scale in (0.5, 0.25, 1.0):
            buffer.copy_(host_tensor([scale] * 3, buffer.device), non_blocking=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert buffer.tolist() == [1.0, 1.0, 1.0]


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
@torch.no_grad()
def test_cuda_host_timesteps_keep_syncs_out_of_the_denoising_loop():
    """DDIM indexes alphas_cumprod with each step's timestep: with device timesteps every step
    syncs (the control); with host_timesteps the number of syncs no longer grows with the steps,
    and the latents are the same."""
    pipe = tiny_sd_pipeline(device="cuda", dtype=torch.float16)

    def count_syncs(steps: int) -> tuple[int, torch.Tensor]:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = latents(pipe, steps=steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught), result

    counts, outputs = {}, {}
    for host in (False, True):
        with accelerated(pipe, cache_interval=3, host_timesteps=host) as handle:
            handle.warmup()
            counts[host] = [count_syncs(steps)[0] for steps in (4, 10)]
            outputs[host] = count_syncs(10)[1]
    assert counts[False][1] > counts[False][0], f"control: device timesteps should sync per step {counts}"
    assert counts[True][1] == counts[True][0], f"host timesteps: syncs per call {counts[True]}"
    assert torch.equal(outputs[True], outputs[False])
