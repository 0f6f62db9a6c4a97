"""LoRA (PEFT) adapters changed after accelerate: the next call uses the new weights and scales.

Reference: a twin pipeline (the same tiny weights; the same LoRA calls in the same order) running
the DeepCache 0.1.1 helper, or nothing when caching is off. Each scenario walks through loading,
rescaling, a second adapter, fusing, unfusing, disabling and unloading, and checks every state:
a stale compiled constant, a stale captured graph or stale kept features would differ by the
LoRA's effect (0.05-0.5 on the tiny pipeline's latents, 1-2 on the two-level one's, which the
compiled and caching-off scenarios use to halve their compile time), far above the bound.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from fastcache.lora import lora_layers
from fastcache.tiny import tiny_sd_pipeline, two_level_sd_pipeline

from .helpers import accelerated, deepcache_latents, latents, max_diff

TOLERANCE = 1e-5
COMPILED_TOLERANCE = 1e-4  # aot_eager decomposes ops; still far below a LoRA's effect


def lora_state_dict(unet: Any, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A random LoRA for `unet`'s attention projections, in diffusers' PEFT key format."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    donor = UNet2DConditionModel.from_config(unet.config)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)
    donor.add_adapter(config, adapter_name="donor")
    return {f"unet.{name}": 0.5 * value for name, value in get_peft_model_state_dict(donor, adapter_name="donor").items()}


_LORAS: dict[tuple[tuple[int, ...], int], dict[str, torch.Tensor]] = {}


def _lora(pipe: Any, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA for `pipe`'s U-Net, made once per U-Net shape and seed."""
    key = (tuple(pipe.unet.config.block_out_channels), seed)
    if key not in _LORAS:
        _LORAS[key] = lora_state_dict(pipe.unet, seed)
    return _LORAS[key]


# (what the user does between calls, call kwargs, whether the graphs must be prepared again)
Step = tuple[str, Callable[[Any], None], dict[str, Any], bool]
SCENARIO: list[Step] = [
    ("no LoRA (first call)", lambda pipe: None, {}, True),
    ("load_lora_weights a", lambda pipe: pipe.load_lora_weights(_lora(pipe, 1), adapter_name="a"), {}, True),
    ("set_adapters a=0.5", lambda pipe: pipe.set_adapters(["a"], [0.5]), {}, False),
    ("call scale 0.3", lambda pipe: None, {"cross_attention_kwargs": {"scale": 0.3}}, False),
    ("load b, a=0.5 b=0.8", lambda pipe: (pipe.load_lora_weights(_lora(pipe, 2), adapter_name="b"),
                                           pipe.set_adapters(["a", "b"], [0.5, 0.8])), {}, True),
    ("set_adapters a=1.2 b=-0.4", lambda pipe: pipe.set_adapters(["a", "b"], [1.2, -0.4]), {}, False),
    ("fuse_lora", lambda pipe: pipe.fuse_lora(), {}, True),
    ("unfuse_lora", lambda pipe: pipe.unfuse_lora(), {}, True),
    ("disable_lora", lambda pipe: pipe.disable_lora(), {}, True),
    ("enable_lora, call scale 0", lambda pipe: pipe.enable_lora(), {"cross_attention_kwargs": {"scale": 0.0}}, True),
    ("after a scale-0 call", lambda pipe: None, {}, False),
    ("delete_adapters b", lambda pipe: pipe.delete_adapters("b"), {}, True),
    ("unload_lora_weights", lambda pipe: pipe.unload_lora_weights(), {}, True),
]


def _twins(build: Callable[[], Any] = tiny_sd_pipeline) -> tuple[Any, Any]:
    return build(), build()


def _graph_count() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


LORA = "LoRA: load_lora_weights, set_adapters, cross_attention_kwargs scale, fuse/unfuse, unload"


@pytest.mark.covers(LORA, "= DeepCache")
@pytest.mark.covers(check="emulated CUDA Graphs")
def test_lora_changes_after_accelerate_match_deepcache():
    """The eager split with graph-replay semantics (static buffers, captured once per change)."""
    reference, pipe = _twins()
    with accelerated(pipe, cache_interval=3, cache_branch_id=0, compile=False, emulate_graphs=True) as handle:
        for name, change, call, _ in SCENARIO:
            change(reference)
            change(pipe)
            expected = deepcache_latents(reference, 3, 0, **call)
            actual = latents(pipe, **call)
            assert max_diff(actual, expected) <= TOLERANCE, name
            assert handle.stats.last_call == [step % 3 == 0 for step in range(10)], name
    assert not lora_layers(pipe.unet)


@pytest.mark.covers(LORA, "caching off = plain")
def test_lora_caching_off_equals_plain_pipeline():
    reference, pipe = _twins(two_level_sd_pipeline)
    with accelerated(pipe, cache_interval=1, compile=False, emulate_graphs=True):
        for name, change, call, _ in SCENARIO:
            change(reference)
            change(pipe)
            assert max_diff(latents(pipe, **call), latents(reference, **call)) <= 1e-6, name


@pytest.mark.covers(LORA, "compiled (dynamo, no graph breaks)")
def test_lora_scale_changes_do_not_recompile():
    """Compiled (dynamo + AOTAutograd): scale changes reuse the graphs; the other changes prepare
    them again automatically, and each state still matches DeepCache."""
    reference, pipe = _twins(two_level_sd_pipeline)
    with accelerated(pipe, cache_interval=3, compile_backend="aot_eager") as handle:
        for name, change, call, must_prepare in SCENARIO[:6]:  # fuse/unfuse: the test above
            change(reference)
            change(pipe)
            graphs, compilations = _graph_count(), handle.compilations
            expected = deepcache_latents(reference, 3, 0, **call)
            actual = latents(pipe, **call)
            assert max_diff(actual, expected) <= COMPILED_TOLERANCE * expected.abs().max().item(), name
            if not must_prepare:
                assert (_graph_count(), handle.compilations) == (graphs, compilations), f"{name} recompiled"
            else:
                assert handle.compilations == compilations + 2, f"{name} did not prepare the graphs again"


def test_lora_changes_in_strict_mode_prepare_warmed_shapes_again():
    """Strict serving refuses unwarmed shapes, but a LoRA change re-prepares the warmed ones."""
    from fastcache.errors import ShapeNotWarmedError

    reference, pipe = _twins()
    with accelerated(pipe, cache_interval=3, compile=False, emulate_graphs=True, strict=True) as handle:
        handle.warmup(height=128, width=128)
        for _, change, call, _ in SCENARIO[:3]:
            change(reference)
            change(pipe)
            assert max_diff(latents(pipe, **call), deepcache_latents(reference, 3, 0, **call)) <= TOLERANCE
        with pytest.raises(ShapeNotWarmedError):
            latents(pipe, height=64, width=64)
        # A shape refused before a model change stays refused after it.
        change, call = SCENARIO[4][1], SCENARIO[4][2]
        change(reference)
        change(pipe)
        assert max_diff(latents(pipe, **call), deepcache_latents(reference, 3, 0, **call)) <= TOLERANCE
        with pytest.raises(ShapeNotWarmedError):
            latents(pipe, height=64, width=64)


def test_model_fingerprint_sees_every_change_a_captured_graph_bakes_in():
    """Each change below alters what a captured graph computes without new inputs, so the
    fingerprint must change; copying weights in place (same storage) must not change it."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from fastcache.lora import model_fingerprint
    from fastcache.tiny import tiny_sd_unet

    unet = tiny_sd_unet()
    attention = next(m for m in unet.modules() if hasattr(m, "set_processor"))
    block = next(m for m in unet.modules() if hasattr(m, "set_chunk_feed_forward"))
    changes: list[tuple[str, Callable[[], Any]]] = [
        ("enable_freeu", lambda: unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)),
        ("another FreeU factor", lambda: unet.enable_freeu(s1=0.8, s2=0.2, b1=1.2, b2=1.4)),
        ("disable_freeu", unet.disable_freeu),
        ("set_chunk_feed_forward", lambda: block.set_chunk_feed_forward(4, dim=1)),
        ("a new processor object", lambda: attention.set_processor(AttnProcessor2_0())),
        ("the processor's attention backend", lambda: setattr(attention.processor, "_attention_backend", "flash")),
        ("a weight given new storage", lambda: setattr(unet.conv_in, "weight",
                                                       torch.nn.Parameter(unet.conv_in.weight.detach().clone()))),
        ("a new sub-module", lambda: setattr(unet, "conv_out", torch.nn.Conv2d(16, 4, 3, padding=1))),
    ]
    for name, change in changes:
        before = model_fingerprint(unet)
        change()
        assert model_fingerprint(unet) != before, name
    before = model_fingerprint(unet)
    with torch.no_grad():
        unet.conv_in.weight.mul_(0.5)  # in place: the graphs read the same storage
    assert model_fingerprint(unet) == before


def test_weights_copied_in_place_keep_graphs():
    """Copying new values into the weights (same storage) needs no new graphs and is seen at once."""
    reference, pipe = _twins()
    with accelerated(pipe, cache_interval=3, compile=False, emulate_graphs=True) as handle:
        latents(pipe)
        captures = handle._runner.captures
        for twin in (reference, pipe):
            with torch.no_grad():
                twin.unet.conv_in.weight.mul_(1.5)
        assert max_diff(latents(pipe), deepcache_latents(reference, 3, 0)) <= TOLERANCE
        assert handle._runner.captures == captures
        # New storage for a weight (assign, not copy) must be noticed: graphs are captured again.
        for twin in (reference, pipe):
            twin.unet.conv_in.weight = torch.nn.Parameter(twin.unet.conv_in.weight.detach() * 0.5)
        assert max_diff(latents(pipe), deepcache_latents(reference, 3, 0)) <= TOLERANCE
        assert handle._runner.captures == 2


def scales_as_tensors(unet: Any) -> list[torch.Tensor]:
    """What PEFT's ``prepare_model_for_compiled_hotswap`` does to the LoRA scales: each becomes a
    0-d float32 tensor on its layer's device. Returns them."""
    tensors = []
    for layer in lora_layers(unet):
        for adapter, value in layer.scaling.items():
            layer.scaling[adapter] = torch.tensor(float(value), device=layer.weight.device)
            tensors.append(layer.scaling[adapter])
    return tensors


@pytest.mark.covers(LORA, "emulated CUDA Graphs")
def test_lora_scales_that_are_tensors_are_copied_not_read():
    """PEFT's compiled hot-swap keeps the scales as tensors, and a call's scale may be one: they
    are copied and multiplied where they live, never read on the host (on a GPU every read would
    wait for it, once per U-Net call); the images equal DeepCache's with the same scales as floats,
    and scales changed in place are seen without a new capture."""
    from .test_host_sync import host_reads_in_unet_calls

    reference, pipe = _twins()
    for twin in (reference, pipe):
        twin.load_lora_weights(_lora(twin, 1), adapter_name="a")
        twin.set_adapters(["a"], [0.5])
    tensors = scales_as_tensors(pipe.unet)
    cases: list[tuple[str, Callable[[], Any], dict[str, Any], dict[str, Any]]] = [
        ("scales 0.5 as tensors", lambda: None, {}, {}),
        ("call scale 0.3 as a tensor", lambda: None,
         {"cross_attention_kwargs": {"scale": torch.tensor(0.3)}}, {"cross_attention_kwargs": {"scale": 0.3}}),
        ("scales doubled in place", lambda: (torch._foreach_mul_(tensors, 2.0), reference.set_adapters(["a"], [1.0])),
         {}, {}),
    ]
    with accelerated(pipe, cache_interval=3, cache_branch_id=0, compile=False, emulate_graphs=True) as handle:
        for name, change, call, reference_call in cases:
            change()
            expected = deepcache_latents(reference, 3, 0, **reference_call)
            with host_reads_in_unet_calls(pipe.unet) as reads:
                actual = latents(pipe, **call)
            assert max_diff(actual, expected) <= TOLERANCE, name
            assert reads.count == 0, f"{name}: {reads.count} host reads of tensor values in U-Net calls"
            assert handle._runner.captures == 2, f"{name}: captured again"
    assert all(layer.scaling["a"] is tensor for layer, tensor in zip(lora_layers(pipe.unet), tensors, strict=True)), \
        "PEFT's own tensors are put back"
    assert all(float(tensor) == 1.0 for tensor in tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA Graph capture and replay)")
@pytest.mark.covers(LORA, "CUDA Graphs", cuda_only=True)
def test_lora_under_real_cuda_graphs():
    """Captured graphs read the LoRA scale buffer: scale changes replay without a re-capture and
    equal DeepCache; fusing re-captures. fp32 on the GPU, so the eager reference is tight."""
    reference, pipe = (tiny_sd_pipeline(device="cuda") for _ in range(2))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, so the bound below is meaningful
    try:
        _walk_scenario_under_cuda_graphs(reference, pipe)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _walk_scenario_under_cuda_graphs(reference: Any, pipe: Any) -> None:
    with accelerated(pipe, cache_interval=3) as handle:
        assert handle.runtime == "cuda-graphs"
        for name, change, call, must_prepare in SCENARIO[:8]:
            change(reference)
            change(pipe)
            captures = handle._runner.captures if not must_prepare else None
            expected = deepcache_latents(reference, 3, 0, **call)
            actual = latents(pipe, **call)
            assert max_diff(actual, expected) <= COMPILED_TOLERANCE * expected.abs().max().item(), name
            if captures is not None:
                assert handle._runner.captures == captures, f"{name} re-captured"
