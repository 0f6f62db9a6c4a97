"""TGATE (gate_step) against the `tgate` 1.0.0 package's DeepCache loaders, plain fastcache and
fastcache's own eager path, on the tiny SD and SDXL pipelines.

References and tolerances:

* eager (``compile=False``) against the package: max |difference| of the final latents <= 1e-5
  (`PACKAGE_TOLERANCE`; the latents' magnitude here is 10-40). TGATE changes these latents by far
  more than that (`test_tgate_changes_the_result`), so a wrong step or layer would fail;
* `gate_step` past the last step against plain fastcache (the same options without gate_step):
  bit-identical;
* compiled (dynamo with the "eager" backend) and emulated CUDA Graphs against fastcache's eager
  TGATE path: relative 1e-5 of max |latents| (`COMPILED_RTOL`).

Each package reference runs on a fresh package state: the package keeps each attention module's
cache across calls (`test_package_keeps_stale_attention_caches_fastcache_does_not`).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

import fastcache
from fastcache.errors import InvalidConfigError, ShapeNotWarmedError, UnsupportedInputError, UnsupportedPipelineError

from .helpers import PROMPT, accelerated, assert_close_relative, assert_untouched, latents, max_diff

pytest.importorskip("tgate")

PACKAGE_TOLERANCE = 1e-5
COMPILED_RTOL = 1e-5
STEPS = 10

# The support table's row (docs/support.md).
TGATE_ROW = "TGATE gate_step, SD 1.x and SDXL text-to-image (reference: the tgate 1.0.0 package)"


def tgate_latents(pipe, interval, branch, gate, steps=STEPS, seed=0, **options):
    """Final latents of the package's ``TgateSDDeepCacheLoader`` / ``TgateSDXLDeepCacheLoader``
    call on `pipe`, from a fresh package state; the pipeline is put back as it was."""
    from tgate import TgateSDDeepCacheLoader, TgateSDXLDeepCacheLoader

    loader = TgateSDXLDeepCacheLoader if isinstance(pipe, StableDiffusionXLPipeline) else TgateSDDeepCacheLoader
    loader(pipe, cache_interval=interval, cache_branch_id=branch)
    try:
        return package_call(pipe, gate, steps, seed, **options)
    finally:
        restore_after_package(pipe)


def package_call(pipe, gate, steps=STEPS, seed=0, **options):
    generator = torch.Generator("cpu").manual_seed(seed)
    options.setdefault("prompt", PROMPT)
    return pipe.tgate(num_inference_steps=steps, generator=generator, output_type="latent", gate_step=gate,
                      **options).images


def restore_after_package(pipe):
    pipe.deepcache.disable()
    for module in pipe.unet.modules():  # the package's patched attention forwards and caches
        if type(module).__name__ == "Attention":
            vars(module).pop("forward", None)
            vars(module).pop("cache", None)
    for name in ("tgate", "deepcache"):
        if name in vars(pipe):
            delattr(pipe, name)
    vars(pipe.unet).pop("forward", None)  # DeepCache's disable leaves the bound forward behind


def fastcache_latents(pipe, interval, branch, gate, steps=STEPS, seed=0, call=None, **options):
    with accelerated(pipe, cache_interval=interval, cache_branch_id=branch, gate_step=gate, **options) as handle:
        result = latents(pipe, seed=seed, steps=steps, **(call or {}))
        return result, handle


# -- against the package ---------------------------------------------------------------------------
@pytest.mark.covers(TGATE_ROW, "= DeepCache")
@pytest.mark.parametrize("gate, interval, branch", [(5, 3, 0), (3, 2, 4), (7, 3, 8), (1, 2, 0), (9, 1, 0)])
def test_sd_matches_the_package(sd_pipe, gate, interval, branch):
    expected = tgate_latents(sd_pipe, interval, branch, gate)
    actual, handle = fastcache_latents(sd_pipe, interval, branch, gate, compile=False)
    assert max_diff(actual, expected) <= PACKAGE_TOLERANCE
    assert handle.stats.pipeline_calls == 1


@pytest.mark.covers(TGATE_ROW, "= DeepCache")
@pytest.mark.parametrize("gate, interval, branch", [(5, 3, 0), (4, 2, 5), (6, 3, 8)])
def test_sdxl_matches_the_package(sdxl_pipe, gate, interval, branch):
    expected = tgate_latents(sdxl_pipe, interval, branch, gate)
    actual, _ = fastcache_latents(sdxl_pipe, interval, branch, gate, compile=False)
    assert max_diff(actual, expected) <= PACKAGE_TOLERANCE


@pytest.mark.parametrize("options", [dict(sp_interval=2, fi_interval=2, warm_up=1),
                                     dict(sp_interval=3, fi_interval=2, warm_up=0),
                                     dict(sp_interval=2, fi_interval=3, warm_up=2)])
def test_self_attention_caching_matches_the_package(any_pipe, options):
    """sp_interval / fi_interval / warm_up: self-attention outputs reused between the steps that
    cache them, per module (the deep modules only run, and cache, on DeepCache's refresh steps)."""
    expected = tgate_latents(any_pipe, 3, 2, 5, **options)
    actual, _ = fastcache_latents(any_pipe, 3, 2, 5, compile=False, **options)
    assert max_diff(actual, expected) <= PACKAGE_TOLERANCE
    plain, _ = fastcache_latents(any_pipe, 3, 2, 5, compile=False)
    assert max_diff(actual, plain) > 100 * PACKAGE_TOLERANCE  # the options do change the result


def test_pndm_counts_steps_as_the_package(sd_pipe):
    """PNDM (PLMS) has one timestep more than steps: the package's loop counts the gate from its
    second U-Net call (num_warmup_steps = 1), and DeepCache numbers the repeated timestep as the
    call before it."""
    scheduler = sd_pipe.scheduler
    sd_pipe.scheduler = PNDMScheduler.from_config(scheduler.config, skip_prk_steps=True)
    try:
        for gate, interval in ((4, 3), (2, 2)):
            expected = tgate_latents(sd_pipe, interval, 1, gate, sp_interval=2, warm_up=1)
            actual, handle = fastcache_latents(sd_pipe, interval, 1, gate, compile=False, sp_interval=2, warm_up=1)
            assert max_diff(actual, expected) <= PACKAGE_TOLERANCE, (gate, interval)
            assert len(handle.stats.last_call) == STEPS + 1
    finally:
        sd_pipe.scheduler = scheduler


def test_batches_and_negative_prompts_match_the_package(sd_pipe):
    """num_images_per_prompt=2 (the gate's mean is per image) and a negative prompt."""
    call = dict(num_images_per_prompt=2, negative_prompt="blurry", guidance_scale=5.0)
    expected = tgate_latents(sd_pipe, 3, 0, 4, **call)
    actual, _ = fastcache_latents(sd_pipe, 3, 0, 4, compile=False, call=call)
    assert max_diff(actual, expected) <= PACKAGE_TOLERANCE


def test_sdxl_batches_with_their_own_negative_sizes_match_the_package(sdxl_pipe):
    """SDXL, two images per prompt, negative size conditions unlike the positive ones. diffusers
    lays the guided time ids out as [negative, positive] repeated per image (not the embeddings'
    [negatives..., positives...]); after the gate the package runs the negative ids alone."""
    call = dict(num_images_per_prompt=2, negative_original_size=(64, 64), negative_target_size=(96, 96))
    expected = tgate_latents(sdxl_pipe, 3, 0, 4, **call)
    actual, _ = fastcache_latents(sdxl_pipe, 3, 0, 4, compile=False, call=call)
    assert max_diff(actual, expected) <= PACKAGE_TOLERANCE
    plain_sizes, _ = fastcache_latents(sdxl_pipe, 3, 0, 4, compile=False, call=dict(num_images_per_prompt=2))
    assert max_diff(actual, plain_sizes) > 100 * PACKAGE_TOLERANCE  # the negative sizes matter here


def test_guidance_rescale_matches_the_package_to_rounding(sd_pipe):
    """Guidance rescale applies before the gate only, in the package. After it, diffusers' own
    loop rescales fastcache's two identical halves: ``g * n + (1 - g) * n``, n up to rounding (an
    ulp or two of the latents: 7.6e-6 here, latents up to 39), so the bound is relative 1e-6."""
    call = dict(guidance_rescale=0.7, guidance_scale=5.0)
    expected = tgate_latents(sd_pipe, 3, 0, 4, **call)
    actual, _ = fastcache_latents(sd_pipe, 3, 0, 4, compile=False, call=call)
    assert_close_relative(actual, expected, 1e-6)


def test_package_keeps_stale_attention_caches_fastcache_does_not(sd_pipe):
    """The package keeps each attention module's cache across pipeline calls: with self-attention
    reuse, its second call differs from its first (a deep module reuses the previous call's output,
    of the other batch size, broadcast). fastcache plans every call as the package's first."""
    from tgate import TgateSDDeepCacheLoader

    options = dict(sp_interval=2, warm_up=1)
    TgateSDDeepCacheLoader(sd_pipe, cache_interval=3, cache_branch_id=2)
    try:
        first = package_call(sd_pipe, 5, **options)
        second = package_call(sd_pipe, 5, **options)
    finally:
        restore_after_package(sd_pipe)
    assert max_diff(first, second) > 100 * PACKAGE_TOLERANCE
    with accelerated(sd_pipe, cache_interval=3, cache_branch_id=2, compile=False, gate_step=5, **options):
        calls = [latents(sd_pipe) for _ in range(2)]
    for actual in calls:
        assert max_diff(actual, first) <= PACKAGE_TOLERANCE


# -- against plain fastcache -----------------------------------------------------------------------
def test_gate_past_the_last_step_is_plain_fastcache(any_pipe):
    expected, plain = fastcache_latents(any_pipe, 3, 1, None, compile=False)
    actual, handle = fastcache_latents(any_pipe, 3, 1, STEPS + 1, compile=False)
    assert torch.equal(actual, expected)
    assert handle.stats.last_call == plain.stats.last_call
    assert handle.stats.last_call_rows == [2] * STEPS


def test_tgate_changes_the_result(any_pipe):
    """Guards the parity tests: TGATE moves the latents far more than their tolerance."""
    plain, _ = fastcache_latents(any_pipe, 3, 0, None, compile=False)
    gated, handle = fastcache_latents(any_pipe, 3, 0, 5, compile=False)
    assert max_diff(gated, plain) > 1000 * PACKAGE_TOLERANCE
    # Refreshes: DeepCache's every 3 steps, re-armed at steps 4 (gate - 1) and 5 (the gate).
    assert handle.stats.last_call == [True, False, False, True, True, True, False, False, True, False]
    # The guided batch (2 rows: unconditional and text) before the gate, its first half after.
    assert handle.stats.last_call_rows == [2] * 5 + [1] * 5


# -- compiled and graphs, against the eager TGATE path -----------------------------------------------
SA_OPTIONS = dict(sp_interval=2, fi_interval=2, warm_up=1)


@pytest.mark.covers(TGATE_ROW, "compiled (dynamo, no graph breaks)")
def test_compiled_matches_eager(sd_pipe):
    """Dynamo (fullgraph, "eager" backend: no inductor codegen) traces every TGATE function: five
    graphs (plain full and shallow, the full one storing the cross-attention means, full and shallow
    at the unguided batch reading them; ~3 s per trace on 2 cores, and dynamo's first use)."""
    expected, _ = fastcache_latents(sd_pipe, 2, 2, 3, steps=6, compile=False)
    with accelerated(sd_pipe, cache_interval=2, cache_branch_id=2, gate_step=3, compile_backend="eager") as handle:
        first = latents(sd_pipe, steps=6)
        second = latents(sd_pipe, steps=6)  # every graph reused
    assert_close_relative(first, expected, COMPILED_RTOL)
    assert_close_relative(second, expected, COMPILED_RTOL)
    assert handle.runtime == "compiled" and handle.compilations == 5


@pytest.mark.parametrize("emulate_graphs", [False, True])
def test_graph_limit_counts_every_graph_of_a_function(two_level_pipe, monkeypatch, caplog, emulate_graphs):
    """RECOMPILE_LIMIT counts graphs per compiled function, as dynamo counts per code object: the
    full TGATE function's second graph (the unguided batch's) is past a limit of 1, so that shape
    runs on the eager split, which reads the cross-attention means the compiled (or captured)
    guided step stored: the same result, call after call."""
    from fastcache import runtime

    expected, _ = fastcache_latents(two_level_pipe, 2, 2, 3, steps=6, compile=False, **SA_OPTIONS)
    monkeypatch.setattr(runtime, "RECOMPILE_LIMIT", 1)
    with accelerated(two_level_pipe, cache_interval=2, cache_branch_id=2, gate_step=3, compile_backend="eager",
                     emulate_graphs=emulate_graphs, **SA_OPTIONS) as handle, \
            caplog.at_level("WARNING", logger="fastcache"):
        first = latents(two_level_pipe, steps=6)
        second = latents(two_level_pipe, steps=6)
        if emulate_graphs:  # every step on the TGATE functions; the guided key's third graph is past the limit
            assert handle.compilations == 2 and len(handle.eager_shapes) == 2
        else:  # plain full and shallow, and the full TGATE function storing the attention means
            assert handle.compilations == 3 and len(handle.eager_shapes) == 1
    assert "RECOMPILE_LIMIT" in caplog.text
    assert_close_relative(first, expected, COMPILED_RTOL)
    assert_close_relative(second, expected, COMPILED_RTOL)


@pytest.mark.covers(TGATE_ROW, "emulated CUDA Graphs")
@pytest.mark.parametrize("pipe_name, tgate", [("sd_pipe", SA_OPTIONS), ("sdxl_pipe", {})])
def test_emulated_graphs_match_eager(request, pipe_name, tgate):
    """The graph runner's buffers (recorded ops replayed, as a CUDA Graph would): cross- and
    self-attention caches written in place by the graphs that store them, read by reference."""
    pipe = request.getfixturevalue(pipe_name)
    expected, _ = fastcache_latents(pipe, 3, 2, 5, compile=False, **tgate)
    with accelerated(pipe, cache_interval=3, cache_branch_id=2, gate_step=5, compile=False, emulate_graphs=True,
                     **tgate) as handle:
        first = latents(pipe)
        second = latents(pipe)  # replays: every graph and buffer reused
    assert_close_relative(first, expected, COMPILED_RTOL)
    assert_close_relative(second, expected, COMPILED_RTOL)
    assert handle.runtime == "emulated-graphs"


@pytest.mark.parametrize("runtime", [dict(compile_backend="eager"), dict(compile_backend="eager", emulate_graphs=True)],
                         ids=["compiled", "emulated-graphs"])
def test_strict_names_an_unwarmed_attention_plan_and_the_step_count_to_warm(two_level_pipe, runtime):
    """With self-attention caching, the attention plans depend on the number of steps: a warm-up
    at another count leaves a plan unprepared, and the error says so (not 'warm this size')."""
    with accelerated(two_level_pipe, cache_interval=3, gate_step=4, strict=True, **SA_OPTIONS, **runtime) as handle:
        handle.warmup(num_inference_steps=6)
        with pytest.raises(ShapeNotWarmedError, match=r"was warmed up, but not with this call's TGATE attention "
                                                      r"plan(.|\n)*num_inference_steps set to the count you serve"):
            latents(two_level_pipe, steps=9)
        assert handle.enabled


def test_memory_report_counts_tgates_buffers_beside_the_pool(sd_pipe):
    """TGATE's attention caches and kept buffers live outside the graph pool, so the report counts
    them on their own (a pool-based total would leave them out). Reference: the eager runner's
    report of the same call (the same caches, and the kept features at the unguided batch)."""
    options = dict(cache_interval=3, cache_branch_id=2, gate_step=5, compile=False)
    with accelerated(sd_pipe, **options) as handle:
        latents(sd_pipe, height=64, width=64)
        eager = handle.memory()
    with accelerated(sd_pipe, emulate_graphs=True, **options) as handle:
        latents(sd_pipe, height=64, width=64)
        graphs = handle.memory()
    noise = 4 * 8 * 8 * 4  # one image's 64x64 latents in fp32
    assert graphs.shapes == 2  # the guided and the unguided batch
    # kept buffers at batch 2 (before the gate) and batch 1 (after it: the eager runner's latest)
    assert graphs.tgate_buffers == eager.tgate_buffers + 3 * eager.kept_features > 3 * eager.kept_features
    assert graphs.static_outputs == (3 * 2 + 2 * 1) * noise  # full, shallow, storing at b2; full, shallow at b1
    assert graphs.total == graphs.static_inputs + graphs.static_outputs + graphs.tgate_buffers
    assert graphs.kept_features == 0


def test_warmup_prepares_every_graph_for_strict_serving(two_level_pipe):
    """Compiled and captured (emulated), strict: warm-up prepares every graph a call uses."""
    expected, _ = fastcache_latents(two_level_pipe, 2, 0, 3, steps=6, compile=False)
    with accelerated(two_level_pipe, cache_interval=2, gate_step=3, compile_backend="eager", emulate_graphs=True,
                     strict=True) as handle:
        report = handle.warmup(num_inference_steps=6)
        compiled = handle.compilations
        actual = latents(two_level_pipe, steps=6)
        assert handle.compilations == compiled  # nothing compiled or captured while serving
    # plain full + shallow, full storing the cross-attention means (gate - 1), full and shallow
    # reading them at the unguided batch
    assert report.compilations == 5
    assert_close_relative(actual, expected, COMPILED_RTOL)


# -- what is refused ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(gate_step=0), "gate_step must be None"),
    (dict(gate_step=2.5), "gate_step must be None"),
    (dict(gate_step=True), "gate_step must be None"),
    (dict(gate_step=5, sp_interval=0), "sp_interval must be an int >= 1"),
    (dict(gate_step=5, fi_interval="2"), "fi_interval must be an int >= 1"),
    (dict(gate_step=5, warm_up=-1), "warm_up must be an int >= 0"),
    (dict(sp_interval=2), "need gate_step"),
    (dict(gate_step=5, schedule="quadratic"), "schedule='uniform'"),
])
def test_invalid_options_are_refused(sd_pipe, options, message):
    with pytest.raises(InvalidConfigError, match=message):
        fastcache.accelerate(sd_pipe, compile=False, **options)
    assert_untouched(sd_pipe)


def test_other_pipelines_are_refused_untouched(sd_pipe):
    img2img = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusionPipeline and StableDiffusionXLPipeline"):
        fastcache.accelerate(img2img, compile=False, gate_step=5)
    assert_untouched(img2img)
    with accelerated(sd_pipe, compile=False, gate_step=5) as handle:
        with pytest.raises(UnsupportedPipelineError):
            handle.attach(img2img)


def test_calls_without_guidance_are_refused(sd_pipe):
    """Without guidance the package fails at the gate (it splits a batch of 1 in two)."""
    with pytest.raises(ValueError):
        tgate_latents(sd_pipe, 3, 0, 3, guidance_scale=1.0)
    with accelerated(sd_pipe, compile=False, gate_step=3):
        with pytest.raises(UnsupportedInputError, match="classifier-free guidance"):
            latents(sd_pipe, guidance_scale=1.0)
        latents(sd_pipe, steps=4)  # the handle still serves


def test_second_order_schedulers_are_refused(sd_pipe):
    scheduler = sd_pipe.scheduler
    sd_pipe.scheduler = HeunDiscreteScheduler.from_config(scheduler.config)
    try:
        with accelerated(sd_pipe, compile=False, gate_step=3):
            with pytest.raises(UnsupportedInputError, match="first-order schedulers"):
                latents(sd_pipe, steps=4)
    finally:
        sd_pipe.scheduler = scheduler


# -- bench -------------------------------------------------------------------------------------------
def test_bench_gate_configs():
    from bench.methods import CacheConfig, CompileSettings, build_methods

    config = CacheConfig.parse("i3b0g10")
    assert config == CacheConfig(3, 0, 10) and config.label == "I3B0G10" and config.reference == "tgate"
    assert CacheConfig.parse("I3B0").reference == "deepcache"
    with pytest.raises(ValueError):
        CacheConfig.parse("I3B0G0")
    labels = [m.label for m in build_methods([CacheConfig(3, 0), config], CompileSettings("eager"))]
    assert labels == ["eager", "compile", "deepcache I3B0", "fastcache I3B0", "tgate I3B0G10", "fastcache I3B0G10"]


def test_bench_tgate_method_is_the_package_and_restores_the_pipeline(sd_pipe):
    """The bench's `tgate` method gives the package's latents (the reference above) and leaves
    the pipeline as built."""
    from bench.methods import CacheConfig, Shape, Tgate, is_restored

    expected = tgate_latents(sd_pipe, 3, 0, 5)
    method = Tgate(CacheConfig(3, 0, 5))
    pipeline_class = type(sd_pipe)
    method.enable(sd_pipe, Shape(128, 128, 1), {})
    try:
        actual = latents(sd_pipe)
    finally:
        method.disable()
    assert torch.equal(actual, expected)
    assert is_restored(sd_pipe, pipeline_class)


def test_bench_run_times_the_calls_before_and_after_the_gate(tmp_path):
    """`python -m bench run` with a gate config (tiny, DDIM, 4 steps, interval 2, gate 2): the
    package's column, fastcache's, their agreement, and fastcache's U-Net calls grouped by batch:
    refreshes at 0 and at the re-arms 1 (gate - 1) and 2 (gate), the guided batch before the gate."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "bench", "run", "--preset", "tiny", "--steps", "4", "--runs", "1",
               "--configs", "I2B0G2", "--compile-backend", "eager", "--restart", "none", "--out", str(tmp_path)]
    completed = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (json_name,) = [n for n in os.listdir(tmp_path) if n.startswith("tiny-") and n.endswith(".json")]
    with open(tmp_path / json_name) as handle:
        (shape,) = json.load(handle)["shapes"]
    methods = {m["label"]: m for m in shape["methods"]}
    assert list(methods) == ["eager", "compile", "tgate I2B0G2", "fastcache I2B0G2"]
    loop = methods["fastcache I2B0G2"]["loop_calls"]
    assert loop["labels"] == ["refresh b2", "refresh b2", "refresh b1", "cached b1"]
    assert set(loop["groups"]) == {"refresh b2", "refresh b1", "cached b1"}
    assert methods["tgate I2B0G2"]["loop_calls"]["labels"] == ["U-Net call"] * 4
    (agreement,) = shape["agreements"]
    assert agreement["fastcache_vs_deepcache"]["latent_rel_l2"] <= 1e-5
    assert agreement["deepcache_vs_eager"]["latent_rel_l2"] > 1e-3
