"""The compiled runtime: inductor graphs against DeepCache and the plain pipeline, no recompiles.

Inductor compiles of the tiny U-Nets take about a minute each on two CPU cores, so inductor runs
cover the production default (branch 0) on SD and SDXL; dynamo's tracing with ``fullgraph=True``
(backend "eager": no inductor codegen) covers every branch. Compiled graphs are shared between
tests by dynamo's own cache (same code, same guards).

Tolerance: inductor reorders float32 reductions, so compiled latents differ from eager ones by
about 1e-6 of their magnitude after 10 steps (measured 1.3e-6); the stated bound is 1e-5 relative
(max abs difference <= 1e-5 * max |reference|) against DeepCache, 1e-4 against the plain pipeline.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import fastcache
from fastcache.errors import ShapeNotWarmedError
from fastcache.runtime import RECOMPILE_LIMIT
from fastcache.tiny import two_level_sd_pipeline
from fastcache.unet_split import UNetSplit, unet_layout

from .helpers import accelerated, assert_close_relative, deepcache_latents, latents, max_diff

COMPILED_RTOL = 1e-5


def _dynamo_graph_count() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.covers(check="compiled (dynamo, no graph breaks)")
def test_inductor_matches_deepcache(any_pipe):
    expected = deepcache_latents(any_pipe, 3, 0)
    with accelerated(any_pipe, cache_interval=3, cache_branch_id=0) as handle:
        actual = latents(any_pipe)
    assert handle.stats.last_call == [step % 3 == 0 for step in range(10)]
    assert_close_relative(actual, expected, COMPILED_RTOL)


@pytest.mark.covers(check="compiled (dynamo, no graph breaks)")
def test_inductor_caching_off_equals_plain(any_pipe):
    expected = latents(any_pipe)
    with accelerated(any_pipe, cache_interval=1) as handle:
        actual = latents(any_pipe)
    assert handle.stats.cached_steps == 0
    assert_close_relative(actual, expected, 1e-4)


@pytest.mark.covers("StableDiffusionPipeline", "compiled (dynamo, no graph breaks)")
def test_no_compilation_after_warmup(sd_pipe):
    with accelerated(sd_pipe, cache_interval=3) as handle:
        report = handle.warmup(height=128, width=128, batch_size=1)
        assert report.new_shapes == ("batch 2, latents 4x16x16, float32 on cpu",)
        graphs, compilations = _dynamo_graph_count(), handle.compilations
        frames = dict(torch._dynamo.utils.counters["frames"])
        latents(sd_pipe, seed=5)
        latents(sd_pipe, seed=6, prompt="another prompt")
        assert _dynamo_graph_count() == graphs
        assert dict(torch._dynamo.utils.counters["frames"]) == frames
        assert handle.compilations == compilations
        assert handle.stats.cached_steps > 0


def test_a_new_shape_compiles_once_and_is_counted(two_level_pipe):
    """The counters of the previous test can see a compilation (backend "eager": dynamo only).

    Dynamo keeps its graphs on the code of the split's functions, shared by every handle of an
    equal U-Net in the process, so a shape another test already traced would be reused and not
    counted: 48x112 is used by this test only.
    """
    with accelerated(two_level_pipe, cache_interval=3, compile_backend="eager") as handle:
        handle.warmup(height=128, width=128)
        graphs, compilations = _dynamo_graph_count(), handle.compilations
        latents(two_level_pipe, height=48, width=112)
        assert (_dynamo_graph_count(), handle.compilations) == (graphs + 2, compilations + 2)
        latents(two_level_pipe, height=48, width=112, seed=1)
        assert (_dynamo_graph_count(), handle.compilations) == (graphs + 2, compilations + 2)


def test_another_handle_in_the_process_leaves_a_handles_graphs_valid(two_level_pipe):
    """Diffusers slices ModuleLists inside forward (``self.resnets[1:]``), which runs torch's global
    module registration hooks, so dynamo guards on those hooks and on what they read. Another
    handle's ModelWatch being added or closed must not touch either: else accelerating a second
    pipeline (a refiner, a second model) or disabling it makes every graph of the first stale,
    a recompile on the hot path, and ShapeNotWarmedError in strict serving (as here)."""
    other = two_level_sd_pipeline()
    with accelerated(two_level_pipe, cache_interval=3, compile_backend="eager", strict=True) as first:
        first.warmup(height=96, width=96)
        before = latents(two_level_pipe, seed=5, height=96, width=96)
        graphs = _dynamo_graph_count()
        with accelerated(other, cache_interval=3, compile_backend="eager", strict=True) as second:
            second.warmup(height=80, width=80)  # a shape of its own: 2 new graphs
            assert _dynamo_graph_count() == graphs + 2
            assert torch.equal(latents(two_level_pipe, seed=5, height=96, width=96), before)
            latents(other, seed=5, height=80, width=80)
        assert torch.equal(latents(two_level_pipe, seed=5, height=96, width=96), before)
        assert _dynamo_graph_count() == graphs + 2 and first.compilations == 2


def test_strict_serving_refuses_unwarmed_shapes(two_level_pipe):
    with accelerated(two_level_pipe, cache_interval=3, compile_backend="eager", strict=True) as handle:
        with pytest.raises(ShapeNotWarmedError, match="no graph was warmed up"):
            latents(two_level_pipe, steps=2)
        handle.warmup(height=128, width=128)
        latents(two_level_pipe, steps=4)
        with pytest.raises(ShapeNotWarmedError, match=r"batch 2, latents 4x8x8(.|\n)*warmed shapes: batch 2, latents 4x16x16"):
            latents(two_level_pipe, height=64, width=64, steps=2)
        assert handle.enabled


@pytest.mark.covers(check="compiled (dynamo, no graph breaks)")
@torch.no_grad()
@torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)  # one code object, a guard set per branch
def test_every_branch_traces_as_one_graph(any_pipe):
    """fullgraph=True: dynamo raises on any graph break. Shallow for every branch, full for the deepest."""
    unet = any_pipe.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    timestep = torch.full((2,), 700.0)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    added = {}
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(2, 32, generator=generator), "time_ids": torch.randn(2, 6, generator=generator)}
    num_branches = unet_layout(unet).num_branches
    deepest = UNetSplit(unet, num_branches - 1)
    full = torch.compile(deepest.full, fullgraph=True, dynamic=False, backend="eager")
    noise, kept = full(sample, timestep, context, added)
    expected_noise, expected_kept = deepest.full(sample, timestep, context, added)
    assert max_diff(noise, expected_noise) == 0 and max_diff(kept, expected_kept) == 0
    for branch in range(num_branches):
        split = UNetSplit(unet, branch)
        _, kept = split.full(sample, timestep, context, added)
        shallow = torch.compile(split.shallow, fullgraph=True, dynamic=False, backend="eager")
        moved = torch.full((2,), 650.0)
        assert max_diff(shallow(sample * 0.9, moved, context, added, kept),
                        split.shallow(sample * 0.9, moved, context, added, kept)) == 0, f"branch {branch}"


@pytest.mark.covers("fastcache.DeepCacheSDHelper (drop-in)", "compiled (dynamo, no graph breaks)")
def test_deepcache_compat_helper_compiled(sd_pipe):
    """The drop-in helper with its defaults (compiled) against the package it replaces."""
    expected = deepcache_latents(sd_pipe, 3, 0)
    helper = fastcache.DeepCacheSDHelper(pipe=sd_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        actual = latents(sd_pipe)
    finally:
        helper.disable()
    assert_close_relative(actual, expected, COMPILED_RTOL)


def test_past_the_recompile_limit_a_shape_runs_eager_with_a_warning_never_silently(two_level_pipe, monkeypatch, caplog):
    """Past the limit a U-Net never silently falls back to eager: the new shape runs on the eager
    split with a warning and is listed in eager_shapes, and the handle keeps serving (issue 13
    item 3; it raised CompileError and disabled the handle before). tests/test_reliability.py
    checks the results."""
    from fastcache import runtime

    monkeypatch.setattr(runtime, "RECOMPILE_LIMIT", 1)
    with accelerated(two_level_pipe, cache_interval=3, compile_backend="eager") as handle:
        latents(two_level_pipe, steps=2, height=64, width=64)
        with caplog.at_level("WARNING", logger="fastcache"):
            latents(two_level_pipe, steps=2, height=96, width=96)
        assert "RECOMPILE_LIMIT" in caplog.text and "runs on the eager split" in caplog.text
        assert handle.enabled and handle.eager_shapes == ("batch 2, latents 4x12x12, float32 on cpu",)
