"""Graph replay: static buffers, the shared kept buffer, caller-owned outputs.

On CPU the GraphRunner runs with ``emulate_graphs=True`` (replaying a recording of the eager
split into the captured outputs instead of a CUDA Graph: tensors read by reference, Python values
baked in), which exercises everything but torch.cuda.CUDAGraph itself. The CUDA tests at the
bottom need a GPU and are skipped without one, saying so.
"""

from __future__ import annotations

import pytest
import torch

import fastcache
from fastcache.graphs import graph_pool_bytes
from fastcache.runtime import MemoryReport
from fastcache.tiny import tiny_sd_pipeline

from .helpers import accelerated, assert_close_relative, deepcache_latents, latents, max_diff


@pytest.mark.covers(check="emulated CUDA Graphs")
def test_emulated_graphs_equal_the_eager_split(any_pipe):
    for branch in (0, 4):
        with accelerated(any_pipe, cache_interval=3, cache_branch_id=branch, compile=False) as handle:
            expected = latents(any_pipe)
        with accelerated(any_pipe, cache_interval=3, cache_branch_id=branch, compile=False, emulate_graphs=True) as handle:
            actual = latents(any_pipe)
            assert handle._runner.captures == 2
        assert max_diff(actual, expected) == 0, f"branch {branch}"


def test_kept_buffer_is_written_in_place_and_read_by_the_shallow_graph(sd_pipe):
    with accelerated(sd_pipe, cache_interval=2, compile=False, emulate_graphs=True) as handle:
        latents(sd_pipe, steps=4)
        (graphs,) = handle._runner._shapes.values()
        kept, pointer = graphs.kept, graphs.kept.data_ptr()
        snapshot = kept.clone()
        latents(sd_pipe, steps=4, seed=9)
        assert graphs.kept is kept and kept.data_ptr() == pointer
        assert not torch.equal(kept, snapshot), "a refresh must rewrite the kept buffer"
        assert handle._runner.captures == 2


def test_outputs_belong_to_the_caller(sd_pipe):
    with accelerated(sd_pipe, cache_interval=2, compile=False, emulate_graphs=True):
        sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
        sd_pipe._fastcache_handle.reset()
        first = sd_pipe.unet(sample, 900, context).sample
        kept_copy = first.clone()
        second = sd_pipe.unet(sample * 0.5, 800, context).sample
        assert first.data_ptr() != second.data_ptr()
        assert torch.equal(first, kept_copy), "a later replay overwrote an output the caller holds"


@pytest.mark.covers("StableDiffusionPipeline", "emulated CUDA Graphs")
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.covers(check="compiled (dynamo, no graph breaks)"))],
                         ids=["eager", "inductor"])
def test_emulated_graphs_match_deepcache(sd_pipe, compile):
    expected = deepcache_latents(sd_pipe, 3, 0)
    with accelerated(sd_pipe, cache_interval=3, compile=compile, emulate_graphs=True):
        actual = latents(sd_pipe)
    assert_close_relative(actual, expected, 1e-5)


FREEU = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)


def _chunk_feed_forward(pipe, chunk_size):
    """What UNet3D's enable_forward_chunking does, for the 2-D U-Net's transformer blocks."""
    for module in pipe.unet.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(chunk_size, dim=1)


# Settings the U-Net's blocks read as plain attributes, applied in turn, then undone.
BAKED_SETTINGS = (
    ("FreeU on", lambda pipe: pipe.enable_freeu(**FREEU)),
    ("feed-forward chunking on", lambda pipe: _chunk_feed_forward(pipe, 4)),  # 4 tokens in the mid block
    ("FreeU off", lambda pipe: pipe.disable_freeu()),
    ("feed-forward chunking off", lambda pipe: _chunk_feed_forward(pipe, None)),
)


@pytest.mark.covers("FreeU, feed-forward chunking (changed after accelerate)", "= DeepCache")
@pytest.mark.covers("FreeU, feed-forward chunking (changed after accelerate)", "emulated CUDA Graphs")
def test_freeu_and_chunking_after_accelerate_prepare_the_graphs_again(sd_pipe):
    """A CUDA Graph bakes in FreeU's factors and the feed-forward chunk size (plain attributes the
    blocks read at capture), so changing them after accelerate must prepare the graphs again.
    Emulated graphs bake them in the same way (the eager split's ops are recorded): with
    stale graphs the images below differ from DeepCache's by ~3.4 (max |diff| on these latents)."""
    actual = []
    with accelerated(sd_pipe, cache_interval=3, compile=False, emulate_graphs=True) as handle:
        latents(sd_pipe, steps=4)
        for name, change in BAKED_SETTINGS:
            runner = handle._runner
            change(sd_pipe)
            actual.append(latents(sd_pipe))
            assert handle._runner is not runner, f"{name}: the graphs were not prepared again"
            assert handle._runner.captures == 2, name
    for (name, change), result in zip(BAKED_SETTINGS, actual):
        change(sd_pipe)
        assert_close_relative(result, deepcache_latents(sd_pipe, 3, 0), 1e-5)
    assert sd_pipe.unet.up_blocks[0].s1 is None and sd_pipe.unet.up_blocks[1].attentions[0].transformer_blocks[0]._chunk_size is None


def test_memory_report_counts_every_buffer_the_runner_holds(sd_pipe):
    """Bytes of the static inputs (latents, timestep, text embeddings), both graphs' outputs and
    the kept features, per shape: tiny SD with CFG runs the U-Net at batch 2 in fp32."""
    expected_kept = {}
    with accelerated(sd_pipe, cache_interval=2, compile=False) as handle:
        for size in (128, 64):
            latents(sd_pipe, steps=4, height=size, width=size)
            eager = handle.memory()
            expected_kept[size] = handle._runner._kept.numel() * 4
            assert eager == MemoryReport(1, 0, 0, expected_kept[size], None), "eager: the latest kept features only"
    with accelerated(sd_pipe, cache_interval=2, compile=False, emulate_graphs=True) as handle:
        reports = []
        for size in (128, 64):
            latents(sd_pipe, steps=4, height=size, width=size)
            reports.append(handle.memory())
    fp32, text = 4, 2 * 77 * 32
    per_shape = {
        size: (
            (2 * 4 * (size // 8) ** 2 + 2 + text) * fp32,  # inputs: latents, timesteps, text
            2 * (2 * 4 * (size // 8) ** 2) * fp32,  # outputs: the full and the shallow graph's noise
            expected_kept[size],
        )
        for size in (128, 64)
    }
    first = MemoryReport(1, *per_shape[128], None)
    both = MemoryReport(2, *(a + b for a, b in zip(per_shape[128], per_shape[64])), None)
    assert reports == [first, both]
    assert both.total == sum(per_shape[128]) + sum(per_shape[64])


def test_graph_pool_bytes_counts_only_the_pools_segments():
    segments = [
        dict(total_size=2 << 20, segment_pool_id=(0, 0)),  # the default pool
        dict(total_size=20 << 20, segment_pool_id=(1, 3)),
        dict(total_size=2 << 20, segment_pool_id=(1, 3)),
        dict(total_size=8 << 20, segment_pool_id=(1, 4)),  # another tool's graphs
    ]
    assert graph_pool_bytes(segments, (1, 3)) == 22 << 20
    report = MemoryReport(1, static_inputs=100, static_outputs=10, kept_features=20, graph_pool=1000)
    assert report.total == 1100, "outputs and kept features live inside the pool"


# -- CUDA --------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA Graph capture and replay)")


@pytest.fixture(scope="module")
def cuda_pipe():
    return tiny_sd_pipeline(device="cuda", dtype=torch.float16)


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
def test_cuda_graph_replay_equals_the_compiled_path(cuda_pipe):
    with accelerated(cuda_pipe, cache_interval=3, cuda_graphs=False):
        expected = latents(cuda_pipe)
    with accelerated(cuda_pipe, cache_interval=3, cuda_graphs=True) as handle:
        handle.warmup()
        actual = latents(cuda_pipe)
        assert handle._runner.captures == 2
    assert_close_relative(actual.float(), expected.float(), 1e-3)


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
def test_cuda_graph_matches_deepcache(cuda_pipe):
    expected = deepcache_latents(cuda_pipe, 3, 0)
    with accelerated(cuda_pipe, cache_interval=3) as handle:
        actual = latents(cuda_pipe)
        assert handle._runner.captures == 2
    assert_close_relative(actual.float(), expected.float(), 2e-2)  # fp16 through 10 steps


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
@torch.no_grad()
def test_cuda_graph_replays_allocate_no_new_memory(cuda_pipe):
    with accelerated(cuda_pipe, cache_interval=2) as handle:
        handle.warmup()
        sample = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
        context = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)
        timestep = torch.tensor(500, device="cuda")
        handle.reset()
        cuda_pipe.unet(sample, timestep, context)  # refresh
        cuda_pipe.unet(sample, timestep, context)  # cached
        torch.cuda.synchronize()
        reserved, segments = torch.cuda.memory_reserved(), torch.cuda.memory_stats()["segment.all.allocated"]
        allocated = torch.cuda.memory_allocated()
        for _ in range(20):
            cuda_pipe.unet(sample, timestep, context)
        torch.cuda.synchronize()
        assert torch.cuda.memory_reserved() == reserved
        assert torch.cuda.memory_stats()["segment.all.allocated"] == segments
        assert torch.cuda.memory_allocated() == allocated


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
@torch.no_grad()
def test_cuda_graphs_of_every_shape_share_one_pool(cuda_pipe):
    """Both graphs of a shape and every warmed shape are captured into one private pool; its
    segments hold the outputs and kept features, and are all fastcache adds besides the inputs."""
    def pools() -> set[tuple[int, int]]:
        return {tuple(segment["segment_pool_id"]) for segment in torch.cuda.memory_snapshot()}

    before = pools()
    with accelerated(cuda_pipe, cache_interval=2) as handle:
        handle.warmup(height=128, width=128)
        one = handle.memory()
        handle.warmup(height=64, width=64)
        two = handle.memory()
        runner = handle._runner
        assert runner.captures == 4 and two.shapes == 2
        new_pools = pools() - before
        assert new_pools == {tuple(runner._pool)}, f"pools this handle's captures created: {new_pools}"
        assert one.graph_pool is not None and 0 < one.graph_pool <= two.graph_pool
        assert two.graph_pool >= two.static_outputs + two.kept_features
        assert two.total <= torch.cuda.memory_reserved()
        print(f"fastcache memory, tiny SD fp16, 128 and 64 px, batch 2: {two}")


@cuda
@pytest.mark.covers("torch.inference_mode around warmup or calls", "CUDA Graphs", cuda_only=True)
def test_cuda_graphs_warmed_in_inference_mode_serve_outside_it(cuda_pipe):
    """Static buffers made under torch.inference_mode would be inference tensors, which a call
    outside it may not copy into; fastcache captures with inference mode off (strict: no capture
    or compile after the warm-up, in either mode)."""
    with accelerated(cuda_pipe, cache_interval=3, cuda_graphs=False):
        expected = latents(cuda_pipe)
    with accelerated(cuda_pipe, cache_interval=3, strict=True) as handle:
        with torch.inference_mode():
            handle.warmup()
        captures = handle._runner.captures
        outside = latents(cuda_pipe)
        with torch.inference_mode():
            inside = latents(cuda_pipe)
        assert handle._runner.captures == captures == 2
    assert_close_relative(outside.float(), expected.float(), 1e-3)
    assert torch.equal(inside, outside)
