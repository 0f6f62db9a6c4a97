"""bench.cpu_memory: the CPU tensor-memory figures issue 5's memory table uses without a GPU.

References are the exact byte counts of the tensors each function creates.
"""

from __future__ import annotations

import torch

from bench.cpu_memory import call_memory, peak_allocated_during, resident_tensor_bytes

MB = 1_000_000  # a 500x500 float32 tensor
SCALAR_SLACK = 64  # the profiler also sees a few scalar-sized allocations (sum results, 0-d tensors)


def _two_live_then_one():
    x = torch.ones(500, 500)
    y = x * 2  # x and y live: 2 MB, the peak
    del x
    z = y + 1  # y and z live: 2 MB again
    del y
    return z.sum()


def test_peak_is_the_most_bytes_live_at_once():
    peak, result = peak_allocated_during(_two_live_then_one)
    assert float(result) == 3.0 * 250_000
    assert 2 * MB <= peak <= 2 * MB + SCALAR_SLACK


def test_inductor_buffers_count_and_fusion_shows():
    """Compiled code allocates through the same CPU allocator: its intermediate buffers are seen.
    Inductor fuses x*2, +1 and the sum, so the 1 MB intermediates of eager never exist."""

    def matmul_then_pointwise(a):
        return (torch.relu(a @ a) * 2 + 1).sum()

    compiled = torch.compile(matmul_then_pointwise, backend="inductor")
    a = torch.randn(500, 500)
    compiled(a)  # compile outside the measurement
    eager_peak, eager_out = peak_allocated_during(lambda: matmul_then_pointwise(a))
    compiled_peak, compiled_out = peak_allocated_during(lambda: compiled(a))
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-2)
    assert 2 * MB <= eager_peak <= 2 * MB + SCALAR_SLACK  # mm out + relu out (then relu out + mul out)
    assert MB <= compiled_peak <= MB + SCALAR_SLACK  # the extern mm's output buffer, then one fused kernel


def test_resident_counts_each_storage_once_and_skips_meta():
    base = resident_tensor_bytes()
    kept = torch.zeros(250_000)  # 1 MB
    views = [kept[:10], kept.view(500, 500), kept]  # same storage
    on_meta = torch.empty(10_000_000, device="meta")  # no memory
    assert resident_tensor_bytes() - base == MB
    del views, on_meta, kept


def test_call_memory_adds_resident_and_the_calls_own_peak():
    kept = torch.zeros(250_000)
    memory = call_memory(_two_live_then_one)
    assert memory.resident_bytes >= kept.nbytes
    assert 2 * MB <= memory.peak_during_bytes <= 2 * MB + SCALAR_SLACK
    assert memory.peak_bytes == memory.resident_bytes + memory.peak_during_bytes
