"""compile_vae / compile_text_encoders: the VAE decoder and text encoders compiled like the U-Net.

Reference: the plain pipeline's decoded images. Backend "eager" (dynamo alone, fullgraph) keeps
CI fast; the inductor path of these models was checked by hand (max |diff| 2.2e-6 on [0, 1]
images, tiny SD pipeline).
"""

from __future__ import annotations

import pytest
import torch

import fastcache
from fastcache.errors import CompileError, InvalidConfigError

from .helpers import PROMPT, accelerated, assert_untouched

SIDE = "compile_vae, compile_text_encoders"


def _images(pipe, prompt: str = PROMPT, seed: int = 0, **kwargs):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=4, generator=generator, output_type="np", **kwargs).images


def _graph_count() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _side_attributes(pipe) -> set[str]:
    found = set()
    for owner, name in ((pipe.vae, "decode"), (pipe.text_encoder, "forward"),
                        (getattr(pipe, "text_encoder_2", None), "forward")):
        if owner is not None and name in vars(owner):
            found.add(f"{type(owner).__name__}.{name}")
    return found


@pytest.mark.covers(SIDE, "caching off = plain")
@pytest.mark.covers(check="compiled (dynamo, no graph breaks)")
def test_compiled_side_models_equal_plain_and_warm_up_once(any_pipe):
    expected = _images(any_pipe)
    with accelerated(any_pipe, cache_interval=1, compile_backend="eager", compile_vae=True,
                     compile_text_encoders=True) as handle:
        assert _side_attributes(any_pipe), "the side models are not installed"
        handle.warmup(height=128, width=128)
        assert all(count == 1 for count in handle._side_models.compiled_shapes.values()), \
            handle._side_models.compiled_shapes
        graphs = _graph_count()
        actual = _images(any_pipe)
        _images(any_pipe, prompt="another prompt", seed=3)
        assert _graph_count() == graphs, "serving after warmup compiled a side model again"
    assert abs(actual - expected).max() <= 1e-6
    assert not _side_attributes(any_pipe)


def test_side_models_need_compile(sd_pipe):
    with pytest.raises(InvalidConfigError, match="need compile=True"):
        fastcache.accelerate(sd_pipe, compile=False, compile_vae=True)
    assert_untouched(sd_pipe)
    assert not _side_attributes(sd_pipe)


def test_a_side_model_compile_failure_restores_the_pipeline(sd_pipe):
    from torch._dynamo import register_backend

    @register_backend(name="fastcache_test_side_failing_backend")
    def failing_backend(graph, example_inputs):
        raise RuntimeError("simulated compiler crash")

    handle = fastcache.accelerate(sd_pipe, compile_backend="fastcache_test_side_failing_backend",
                                  compile_text_encoders=True)
    with pytest.raises(CompileError, match="text encoder(.|\n)*restored to its original state"):
        _images(sd_pipe)
    assert not handle.enabled
    assert_untouched(sd_pipe)
    assert not _side_attributes(sd_pipe)


def test_side_models_serve_in_and_out_of_inference_mode_without_compiling(sd_pipe):
    """A warm-up under torch.inference_mode, calls outside it (and back): the same images and no
    new graph (inference-tensor inputs would change dynamo's guards)."""
    expected = _images(sd_pipe)
    with accelerated(sd_pipe, cache_interval=1, compile_backend="eager", compile_vae=True,
                     compile_text_encoders=True) as handle:
        with torch.inference_mode():
            handle.warmup(height=128, width=128)
        graphs = _graph_count()
        actual = _images(sd_pipe)
        with torch.inference_mode():
            again = _images(sd_pipe)
        assert _graph_count() == graphs, "a change of inference mode compiled a side model again"
    assert abs(actual - expected).max() <= 1e-6 and abs(again - expected).max() <= 1e-6
