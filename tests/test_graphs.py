"""Graph replay: static buffers, the shared kept buffer, caller-owned outputs.

On CPU the GraphRunner runs with ``emulate_graphs=True`` (replaying a recording of the eager
split into the captured outputs instead of a CUDA Graph: tensors read by reference, Python values
baked in), which exercises everything but torch.cuda.CUDAGraph itself. The CUDA tests at the
bottom need a GPU and are skipped without one, saying so; they compare every step's noise bit for
bit with the same split run without graphs (a graph replays that path's very kernels).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from typing import Any, Iterator

import pytest
import torch

import fastcache
from fastcache.errors import InvalidConfigError
from fastcache.graphs import graph_pool_bytes
from fastcache.runtime import MemoryReport, compile_kwargs
from fastcache.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

from .helpers import accelerated, assert_close_relative, assert_untouched, deepcache_latents, latents, max_diff


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


@torch.no_grad()
def test_a_graph_captured_under_autocast_records_its_casts_and_serves_only_calls_under_it():
    """Under autocast the capture must record the weight casts (autocast's cache would hand it
    copies that are freed when the region ends: replays on a GPU would read freed memory), and a
    call outside autocast must not replay the autocast graph (it would return bfloat16).
    References: the plain U-Net under the same autocast state, bit for bit."""
    pipe = tiny_sd_pipeline()
    generator = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    weights = {parameter.data_ptr() for parameter in pipe.unet.parameters()}
    plain = pipe.unet(sample, 900, context).sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_bf16 = pipe.unet(sample, 900, context).sample
    with accelerated(pipe, cache_interval=2, compile=False, emulate_graphs=True) as handle:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = pipe.unet(sample, 900, context).sample
        (graphs,) = handle._runner._shapes.values()
        recorded_casts = sum(1 for op, args, _, _ in graphs.full._replay_function._tape
                             if op is torch.ops.aten._to_copy.default and torch.is_tensor(args[0])
                             and args[0].data_ptr() in weights)
        handle.reset()
        outside = pipe.unet(sample, 900, context).sample
        assert handle._runner.captures == 2  # a full graph for each autocast state
    assert recorded_casts > 0
    assert under.dtype == torch.bfloat16 and torch.equal(under, plain_bf16)
    assert outside.dtype == torch.float32 and torch.equal(outside, plain)


@pytest.mark.covers("StableDiffusionPipeline", "emulated CUDA Graphs")
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.covers(check="compiled (dynamo, no graph breaks)"))],
                         ids=["eager", "inductor"])
def test_emulated_graphs_match_deepcache(sd_pipe, compile):
    """The inductor case shares its compiled graphs with tests/test_compiled.py's SD parity (the
    same code, options and shapes: inductor's cache), so the tiny U-Net costs one cold compile."""
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


# -- captures in a threaded process ------------------------------------------------------------
def test_captures_in_different_threads_take_turns(sd_pipe, sdxl_pipe, monkeypatch):
    """Every warm-up + capture holds graphs.CAPTURE_LOCK, process-wide: two handles capturing
    from two threads at once take turns (each capture below lasts 0.2 s, so without the lock
    they would overlap), and each still gives the eager split's latents."""
    from fastcache import graphs

    original = graphs.CapturedFunction.__init__
    running, overlaps, unlocked = [0], [], []

    def slow_capture(self, function, pool, emulate):
        running[0] += 1
        overlaps.append(running[0])
        unlocked.append(not graphs.CAPTURE_LOCK.locked())
        time.sleep(0.2)
        try:
            original(self, function, pool, emulate)
        finally:
            running[0] -= 1

    expected = {}
    for name, pipe in (("sd", sd_pipe), ("sdxl", sdxl_pipe)):
        with accelerated(pipe, cache_interval=2, compile=False):
            expected[name] = latents(pipe, steps=3)
    monkeypatch.setattr(graphs.CapturedFunction, "__init__", slow_capture)
    with accelerated(sd_pipe, cache_interval=2, compile=False, emulate_graphs=True), \
            accelerated(sdxl_pipe, cache_interval=2, compile=False, emulate_graphs=True):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(latents, pipe, steps=3) for name, pipe in (("sd", sd_pipe), ("sdxl", sdxl_pipe))}
            actual = {name: future.result() for name, future in futures.items()}
    assert len(overlaps) == 4 and max(overlaps) == 1, f"captures under way at each capture's start: {overlaps}"
    assert not any(unlocked)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_strict_serving_warmed_at_start_never_captures_while_serving(sd_pipe):
    """The rule for threaded servers (a capture makes its call wait for the GPU, and runs beside
    other threads' work): warm up every shape at start and serve with strict=True. Then calls
    from many threads capture nothing, and a shape that was not warmed up raises instead of
    capturing mid-request."""
    from fastcache.errors import ShapeNotWarmedError

    seeds = range(4)
    with accelerated(sd_pipe, cache_interval=3, compile=False):
        expected = [latents(sd_pipe, seed=seed, steps=4) for seed in seeds]
    with accelerated(sd_pipe, cache_interval=3, compile=False, emulate_graphs=True, strict=True) as handle:
        handle.warmup(height=128, width=128)
        captures = handle._runner.captures
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            actual = list(pool.map(lambda seed: latents(sd_pipe, seed=seed, steps=4), seeds))
            unwarmed = pool.submit(latents, sd_pipe, steps=4, height=64, width=64)
            with pytest.raises(ShapeNotWarmedError):
                unwarmed.result()
        assert captures == 2 and handle._runner.captures == captures, "a capture while serving"
    for seed, (result, reference) in enumerate(zip(actual, expected)):
        assert torch.equal(result, reference), f"seed {seed}"


# -- inductor's own CUDA Graphs ------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"triton.cudagraphs": True}, {"cudagraph_policy": object()}],
                         ids=["triton.cudagraphs", "cudagraph_policy"])
def test_options_that_turn_on_inductors_cuda_graphs_are_refused(sd_pipe, options):
    with pytest.raises(InvalidConfigError, match="inductor's own CUDA Graphs"):
        fastcache.accelerate(sd_pipe, compile_options=options)
    assert_untouched(sd_pipe)
    fastcache.accelerate(sd_pipe, compile_options={"triton.cudagraphs": False}).disable()  # what fastcache sets anyway


def test_inductor_compiles_without_its_cuda_graphs_whatever_the_environment():
    """TORCHINDUCTOR_CUDAGRAPHS=1 turns inductor's CUDA Graphs on by default (simulated here by
    patching the config): fastcache's torch.compile arguments turn them off, with a mode too
    (passed as the mode's options, since torch.compile takes one or the other)."""
    import torch._inductor.config as inductor_config

    autotune = {"max_autotune": True, "coordinate_descent_tuning": True}
    with inductor_config.patch({"triton.cudagraphs": True}):
        for mode, expected in ((None, {}), ("default", {}), ("max-autotune-no-cudagraphs", autotune)):
            kwargs = compile_kwargs("inductor", mode, {"conv_1x1_as_mm": True})
            assert "mode" not in kwargs, mode
            wrapper = torch._TorchCompileInductorWrapper(None, kwargs["options"], False)
            assert wrapper.config == {**expected, "conv_1x1_as_mm": True, "triton.cudagraphs": False}, mode
            torch.compile(lambda x: x + 1, **kwargs)  # torch accepts the arguments (compiles on first call)
    assert compile_kwargs("aot_eager") == dict(fullgraph=True, dynamic=False, backend="aot_eager")


def test_graphs_on_a_cpu_get_the_cpu_inductor_defaults_unless_the_user_names_them():
    """layout_optimization off on a CPU (CPU_INDUCTOR_DEFAULTS; measured in bench/NOTES.md), inductor's
    own default on CUDA, and the user's compile_options over both."""
    from fastcache.runtime import CPU_INDUCTOR_DEFAULTS

    assert CPU_INDUCTOR_DEFAULTS == {"layout_optimization": False}
    assert compile_kwargs("inductor", None, {}, "cpu")["options"] == {"layout_optimization": False,
                                                                      "triton.cudagraphs": False}
    assert compile_kwargs("inductor", None, {}, "cuda")["options"] == {"triton.cudagraphs": False}
    chosen = compile_kwargs("inductor", None, {"layout_optimization": True}, "cpu")["options"]
    assert chosen["layout_optimization"] is True
    assert compile_kwargs("aot_eager", None, {}, "cpu") == dict(fullgraph=True, dynamic=False, backend="aot_eager")
    pipe_config = fastcache.FastCacheConfig.from_options(compile_options={"freezing": False})
    assert pipe_config.compile_kwargs("cpu")["options"] == {"layout_optimization": False, "freezing": False,
                                                            "triton.cudagraphs": False}
    pipe = tiny_sd_pipeline()
    for given, expected in (({}, False), ({"layout_optimization": True}, True)):
        handle = fastcache.accelerate(pipe, compile=True, compile_options=given)  # compiles on first call only
        try:
            assert handle._runner.compiled.options["options"]["layout_optimization"] is expected
        finally:
            handle.disable()


# -- CUDA --------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA Graph capture and replay)")


@pytest.fixture(scope="module")
def cuda_pipe():
    return tiny_sd_pipeline(device="cuda", dtype=torch.float16)


@contextlib.contextmanager
def unet_outputs(unet: Any) -> Iterator[list[torch.Tensor]]:
    """Collects a copy of every noise prediction ``unet.forward`` (fastcache's, as installed now)
    returns, and puts that forward back afterwards."""
    forward = unet.forward
    outputs: list[torch.Tensor] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        result = forward(*args, **kwargs)
        outputs.append((result[0] if isinstance(result, tuple) else result.sample).clone())
        return result

    unet.forward = recorded
    try:
        yield outputs
    finally:
        unet.forward = forward


def noise_per_step(pipe: Any, **call: Any) -> list[torch.Tensor]:
    """The U-Net's output at every step of one pipeline call (`latents` with `call`)."""
    with unet_outputs(pipe.unet) as outputs:
        latents(pipe, **call)
    return outputs


def assert_equal_steps(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str = "") -> None:
    """Bit for bit, step by step: a graph replays the very kernels of the path it is compared to."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} U-Net calls, expected {len(expected)}"
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"{what} step {step}: max |diff| {max_diff(a, e):.3g}"


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
def test_cuda_graph_replay_equals_the_compiled_path(cuda_pipe):
    with accelerated(cuda_pipe, cache_interval=3, cuda_graphs=False):
        expected = noise_per_step(cuda_pipe)
    with accelerated(cuda_pipe, cache_interval=3, cuda_graphs=True) as handle:
        handle.warmup()
        actual = noise_per_step(cuda_pipe)
        assert handle._runner.captures == 2
    assert_equal_steps(actual, expected)


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
    assert torch.equal(outside, expected)
    assert torch.equal(inside, outside)


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
def test_cuda_graphs_of_two_shapes_used_alternately(cuda_pipe):
    """Both shapes' graphs share one pool: each shape's kept features must survive its own
    cached steps whatever the other shape's graphs did to the pool in between."""
    sizes = (128, 64, 128, 64)
    with accelerated(cuda_pipe, cache_interval=3, cuda_graphs=False):
        expected = [noise_per_step(cuda_pipe, height=size, width=size, seed=index) for index, size in enumerate(sizes)]
    with accelerated(cuda_pipe, cache_interval=3) as handle:
        actual = [noise_per_step(cuda_pipe, height=size, width=size, seed=index) for index, size in enumerate(sizes)]
        assert handle._runner.captures == 4
    for index, size in enumerate(sizes):
        assert_equal_steps(actual[index], expected[index], f"call {index} ({size} px)")


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
def test_cuda_graphs_of_the_eager_split_equal_the_eager_split(cuda_pipe):
    """compile=False with CUDA Graphs: the eager split's own kernels, captured."""
    with accelerated(cuda_pipe, cache_interval=3, compile=False, cuda_graphs=False):
        expected = noise_per_step(cuda_pipe)
    with accelerated(cuda_pipe, cache_interval=3, compile=False) as handle:
        assert handle.runtime == "cuda-graphs"
        actual = noise_per_step(cuda_pipe)
        assert handle._runner.captures == 2
    assert_equal_steps(actual, expected)


@cuda
@pytest.mark.covers("FreeU, feed-forward chunking (changed after accelerate)", "CUDA Graphs", cuda_only=True)
@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager-split"])
def test_cuda_graphs_with_freeu_at_a_deep_branch(cuda_pipe, compile):
    """FreeU scales the kept features in place at every cached step (tests/test_graph_inputs.py);
    the warm-ups and the capture must not, so replays equal the same split without graphs."""
    cuda_pipe.enable_freeu(**FREEU)
    try:
        options = dict(cache_interval=3, cache_branch_id=9, compile=compile)
        with accelerated(cuda_pipe, cuda_graphs=False, **options):
            expected = noise_per_step(cuda_pipe)
        with accelerated(cuda_pipe, **options) as handle:
            actual = noise_per_step(cuda_pipe)
            assert handle._runner.captures == 2
    finally:
        cuda_pipe.disable_freeu()
    assert_equal_steps(actual, expected)


@cuda
@pytest.mark.covers("StableDiffusionXLPipeline", "CUDA Graphs", cuda_only=True)
def test_cuda_graphs_with_sdxls_added_conditions():
    pipe = tiny_sdxl_pipeline(device="cuda", dtype=torch.float16)
    with accelerated(pipe, cache_interval=3, cuda_graphs=False):
        expected = noise_per_step(pipe)
    with accelerated(pipe, cache_interval=3) as handle:
        actual = noise_per_step(pipe)
        assert handle._runner.captures == 2
    assert_equal_steps(actual, expected)


@cuda
@pytest.mark.covers("LoRA: load_lora_weights, set_adapters, cross_attention_kwargs scale, fuse/unfuse, unload",
                    "CUDA Graphs", cuda_only=True)
def test_cuda_graphs_follow_lora_scale_changes_like_eager():
    """Scale changes (set_adapters, a call's scale, a device-tensor scale) reach the captured
    graphs through the scale buffer, with no new capture; each step equals the eager split's."""
    from .test_lora import LORA_A

    pipe = tiny_sd_pipeline(device="cuda")
    pipe.load_lora_weights(LORA_A, adapter_name="a")
    states = [
        ("adapter a=1.0", lambda: pipe.set_adapters(["a"], [1.0]), {}),
        ("call scale 0.3", lambda: None, {"cross_attention_kwargs": {"scale": 0.3}}),
        ("set_adapters a=0.5", lambda: pipe.set_adapters(["a"], [0.5]), {}),
        ("device-tensor call scale 1.7", lambda: None,
         {"cross_attention_kwargs": {"scale": torch.tensor(1.7, device="cuda")}}),
    ]
    results = {}
    for graphs in (False, True):
        with accelerated(pipe, cache_interval=3, compile=False, cuda_graphs=graphs) as handle:
            results[graphs] = []
            for _, change, call in states:
                change()
                results[graphs].append(noise_per_step(pipe, **call))
            if graphs:
                assert handle._runner.captures == 2, "a scale change captured again"
    for index, (name, _, _) in enumerate(states):
        assert_equal_steps(results[True][index], results[False][index], name)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two CUDA GPUs (a U-Net on a device that is not the current one)")
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
def test_cuda_graphs_of_a_unet_on_a_device_that_is_not_current():
    """Captured on cuda:0's stream, the graph of a U-Net on cuda:1 would be empty and every replay
    would return the capture-time output; two seeds tell that apart from the compiled path."""
    pipe = tiny_sd_pipeline(device="cuda:1", dtype=torch.float16)
    torch.cuda.set_device(0)
    with accelerated(pipe, cache_interval=3, cuda_graphs=False):
        expected = [noise_per_step(pipe, seed=seed) for seed in (0, 1)]
    with accelerated(pipe, cache_interval=3) as handle:
        actual = [noise_per_step(pipe, seed=seed) for seed in (0, 1)]
        assert handle._runner.captures == 2
    assert torch.cuda.current_device() == 0
    for seed in (0, 1):
        assert_equal_steps(actual[seed], expected[seed], f"seed {seed}")


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
@torch.no_grad()
def test_cuda_graph_calls_from_other_streams_are_ordered_on_the_gpu():
    """Callers on their own streams (a server running each request under torch.cuda.stream):
    each call's inputs and LoRA scale are made on its stream behind a long GPU sleep, and the
    next call comes at once from another stream. The host lock does not order their GPU work;
    the runner's replay stream and the scale buffer's event must, so each call equals the same
    sequence of calls on one stream."""
    from .test_lora import LORA_A

    pipe = tiny_sd_pipeline(device="cuda", dtype=torch.float16)
    pipe.load_lora_weights(LORA_A, adapter_name="a")
    generator = torch.Generator(device="cuda").manual_seed(0)
    calls = [
        (torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16, generator=generator), 900 - 100 * index,
         {"scale": 0.3 if index % 2 else 0.9})
        for index in range(6)
    ]
    context = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16, generator=generator)
    with accelerated(pipe, cache_interval=3) as handle:
        handle.warmup()
        handle.reset()
        expected = [pipe.unet(sample, timestep, context, cross_attention_kwargs=scale).sample
                    for sample, timestep, scale in calls]
        torch.cuda.synchronize()
        streams = (torch.cuda.Stream(), torch.cuda.Stream())
        handle.reset()
        actual = []
        for index, (sample, timestep, scale) in enumerate(calls):
            stream = streams[index % 2]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                torch.cuda._sleep(50_000_000)  # this caller's stream runs far behind the host
                staged = sample * 1  # the call's input, made on the caller's stream after the sleep
                actual.append(pipe.unet(staged, timestep, context, cross_attention_kwargs=scale).sample)
        torch.cuda.synchronize()
        assert handle._runner.captures == 2
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"call {index}: max |diff| {max_diff(a, e):.3g}"


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
def test_cuda_pipeline_calls_from_threads_on_their_own_streams(cuda_pipe):
    seeds = range(4)
    with accelerated(cuda_pipe, cache_interval=3, cuda_graphs=False):
        expected = [latents(cuda_pipe, seed=seed) for seed in seeds]
    with accelerated(cuda_pipe, cache_interval=3, strict=True) as handle:
        handle.warmup()

        def serve(seed: int) -> torch.Tensor:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                result = latents(cuda_pipe, seed=seed)
            stream.synchronize()
            return result

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            actual = list(pool.map(serve, seeds))
        assert handle._runner.captures == 2
    for seed in seeds:
        assert torch.equal(actual[seed], expected[seed]), f"seed {seed}"


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
def test_cuda_capture_while_another_thread_works_on_the_gpu(cuda_pipe):
    """Non-strict serving captures a new shape mid-request while other threads use the GPU
    (allocating, computing on the default stream, reading values back): the capture is
    thread-local, so neither side fails and the graphs are right. No GEMM in the other thread:
    clearing cuBLAS workspaces around a capture (as inductor does) can free one that a GEMM there
    is about to use, a race torch accepts too (graphs.py's docstring)."""
    with accelerated(cuda_pipe, cache_interval=3, cuda_graphs=False):
        expected = noise_per_step(cuda_pipe, height=64, width=64)
    stop, errors = threading.Event(), []

    def busy() -> None:
        try:
            size = 64
            while not stop.is_set():
                size = 64 + (size * 7) % 512  # new sizes: fresh allocations now and then
                x = torch.randn(size, size, device="cuda")
                (x * x + 1.0).sum().item()
        except Exception as error:  # reported below
            errors.append(error)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        with accelerated(cuda_pipe, cache_interval=3) as handle:
            actual = noise_per_step(cuda_pipe, height=64, width=64)
            assert handle._runner.captures == 2
    finally:
        stop.set()
        worker.join()
    assert not errors, f"the other thread failed: {errors[0]!r}"
    assert_equal_steps(actual, expected)


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
def test_cuda_graphs_with_inductors_own_cuda_graphs_on_by_default(cuda_pipe):
    """TORCHINDUCTOR_CUDAGRAPHS=1 (simulated by patching its config default) must not nest
    inductor's captures inside fastcache's."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"triton.cudagraphs": True}):
        with accelerated(cuda_pipe, cache_interval=3, cuda_graphs=False):
            expected = noise_per_step(cuda_pipe)
        with accelerated(cuda_pipe, cache_interval=3) as handle:
            actual = noise_per_step(cuda_pipe)
            assert handle._runner.captures == 2
    assert_equal_steps(actual, expected)


@cuda
@pytest.mark.covers("StableDiffusionPipeline", "CUDA Graphs", cuda_only=True)
@torch.no_grad()
def test_cuda_graph_pool_is_given_back_by_disable(cuda_pipe):
    """After disable() no segment of the graphs' pool is left (a cuBLAS workspace made during a
    capture would pin one for good) and the reserved memory shrinks by at least the pool."""
    from fastcache.graphs import graph_pool_bytes

    handle = fastcache.accelerate(cuda_pipe, cache_interval=2)
    try:
        handle.warmup(height=128, width=128)
        handle.warmup(height=64, width=64)
        torch.cuda.synchronize()
        pool, report = handle._runner._pool, handle.memory()
        reserved = torch.cuda.memory_reserved()
        assert report.graph_pool == graph_pool_bytes(torch.cuda.memory_snapshot(), pool) > 0
    finally:
        handle.disable()
    assert graph_pool_bytes(torch.cuda.memory_snapshot(), pool) == 0, "the pool outlives disable()"
    assert torch.cuda.memory_reserved() <= reserved - report.graph_pool


class _FakeCapture:
    """Stands for torch.cuda.graph on a CPU: its exit (capture_end) raises when told to."""

    def __init__(self, end_error: Exception | None) -> None:
        self.end_error, self.exits = end_error, []

    def __call__(self, *args: Any, **kwargs: Any) -> "_FakeCapture":
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: Any) -> None:
        self.exits.append(exc_info[0])
        if self.end_error is not None:
            raise self.end_error


def test_a_capture_cuda_aborts_names_the_first_error_and_stops_later_captures(monkeypatch):
    """torch's capture_end raising leaves its allocator mid-capture for the process: the error
    names what failed inside the capture, and no later capture is attempted. An error inside a
    capture that CUDA ends cleanly is raised as it is and stops nothing."""
    from fastcache import graphs

    monkeypatch.setattr(graphs, "_capture_aborted", None)
    clean = _FakeCapture(None)
    monkeypatch.setattr(torch.cuda, "graph", clean)
    with pytest.raises(ValueError, match="a bad input"):
        with graphs.cuda_capture(None, None, None):
            raise ValueError("a bad input")
    assert clean.exits == [ValueError] and graphs._capture_aborted is None

    aborting = _FakeCapture(RuntimeError("CUDA error: operation failed due to a previous error during capture"))
    monkeypatch.setattr(torch.cuda, "graph", aborting)
    with pytest.raises(graphs.CaptureAborted) as aborted:
        with graphs.cuda_capture(None, None, None):
            raise RuntimeError("operation not permitted when stream is capturing (an .item() in a processor)")
    message = str(aborted.value)
    assert "the first error inside it: RuntimeError: operation not permitted" in message
    assert "previous error during capture" in message and "no more graphs" in message

    later = _FakeCapture(None)
    monkeypatch.setattr(torch.cuda, "graph", later)
    with pytest.raises(graphs.CaptureAborted, match="an earlier capture in this process was aborted"):
        with graphs.cuda_capture(None, None, None):
            pass
    assert later.exits == []  # not even begun
