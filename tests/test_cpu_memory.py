"""bench.cpu_memory: the CPU tensor-memory figures issue 5's memory table uses without a GPU.

References are the exact byte counts of the tensors each function creates and frees.
"""

from __future__ import annotations

import torch

from bench.cpu_memory import call_memory, resident_tensor_bytes

MB = 1_000_000  # a 250_000-element float32 tensor
SCALAR_SLACK = 64  # the profiler also sees a few scalar-sized allocations (sum results, 0-d tensors)


def _two_live_then_one():
    x = torch.ones(250_000)
    y = x * 2  # x and y live: 2 MB, the peak
    del x
    z = y + 1  # y and z live: 2 MB again
    del y
    return z.sum()


def test_peak_is_the_most_bytes_live_at_once():
    memory = call_memory(_two_live_then_one)
    assert 2 * MB <= memory.peak_during_bytes <= 2 * MB + SCALAR_SLACK
    assert memory.peak_bytes == memory.resident_bytes + memory.peak_during_bytes


def test_state_replaced_from_the_previous_call_is_not_counted_twice():
    """DeepCache-like: each call replaces two kept 1 MB tensors, one after the other. Live bytes:
    2 MB kept, 3 MB while the first new one and both old ones exist, back to 2 MB, 3 MB, 2 MB.
    So 1 MB above resident; counting the old tensors as never freed would say 2 MB."""
    state: dict[str, torch.Tensor] = {}

    def replaces_its_state():
        state["a"] = torch.ones(250_000)
        state["b"] = torch.ones(250_000)

    replaces_its_state()  # state from "the previous call", allocated before any profiling
    memory = call_memory(replaces_its_state)
    assert MB <= memory.peak_during_bytes <= MB + SCALAR_SLACK
    kept = state["a"].nbytes + state["b"].nbytes
    assert memory.resident_bytes >= kept


def test_inductor_buffers_count_and_fusion_shows():
    """Compiled code allocates through the same CPU allocator: its intermediate buffers are seen.
    Inductor fuses relu, *2, +1 and the sum, so eager's second 1 MB intermediate never exists."""

    def matmul_then_pointwise(a):
        return (torch.relu(a @ a) * 2 + 1).sum()

    compiled = torch.compile(matmul_then_pointwise, backend="inductor")
    a = torch.randn(500, 500)
    torch.testing.assert_close(compiled(a), matmul_then_pointwise(a), rtol=1e-4, atol=1e-2)
    eager = call_memory(lambda: matmul_then_pointwise(a))
    fused = call_memory(lambda: compiled(a))
    assert 2 * MB <= eager.peak_during_bytes <= 2 * MB + SCALAR_SLACK  # mm out + relu out, relu out + mul out
    assert MB <= fused.peak_during_bytes <= MB + SCALAR_SLACK  # the extern mm's output, then one fused kernel


def test_resident_counts_each_storage_once_and_skips_meta():
    base = resident_tensor_bytes()
    kept = torch.zeros(250_000)
    views = [kept[:10], kept.view(500, 500), kept]  # same storage
    on_meta = torch.empty(10_000_000, device="meta")  # no memory
    assert resident_tensor_bytes() - base == MB
    del views, on_meta, kept
