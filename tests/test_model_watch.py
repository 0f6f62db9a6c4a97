"""ModelWatch sees every change a graph bakes in through one of its tracked points, and nothing
else; the full fingerprint (lora.model_fingerprint) is the reference it is checked against."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from fastcache.lora import model_fingerprint
from fastcache.model_watch import WATCHED_METHODS, ModelWatch
from fastcache.tiny import tiny_sd_unet


def _lora(unet: Any, name: str) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]), adapter_name=name)


def _first(unet: Any, attribute: str) -> Any:
    return next(m for m in unet.modules() if hasattr(m, attribute))


# Every change below alters the full fingerprint (what the graphs bake in); each goes through a
# different tracked point: a registration hook, a wrapped entry point, or the per-call probe.
CHANGES: list[tuple[str, Callable[[Any], Any]]] = [
    ("LoRA layers added (module registration)", lambda u: _lora(u, "a")),
    ("a second adapter", lambda u: _lora(u, "b")),
    ("set_adapters", lambda u: u.set_adapters(["a"])),
    ("fuse_lora", lambda u: u.fuse_lora()),
    ("unfuse_lora", lambda u: u.unfuse_lora()),
    ("disable_lora", lambda u: u.disable_lora()),
    ("enable_lora", lambda u: u.enable_lora()),
    ("delete_adapters", lambda u: u.delete_adapters("b")),
    ("enable_freeu", lambda u: u.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)),
    ("FreeU factor set on a block", lambda u: setattr(u.up_blocks[1], "b1", 1.3)),
    ("a block's set_chunk_feed_forward", lambda u: _first(u, "set_chunk_feed_forward").set_chunk_feed_forward(4, dim=1)),
    ("set_attn_processor", lambda u: u.set_attn_processor(_processor())),
    ("an attention module's set_processor", lambda u: _first(u, "set_processor").set_processor(_processor())),
    ("a processor's attention backend", lambda u: setattr(_first(u, "set_processor").processor, "_attention_backend", "x")),
    ("a weight given new storage", lambda u: setattr(u.conv_out, "weight", torch.nn.Parameter(u.conv_out.weight.detach().clone()))),
    ("a new sub-module", lambda u: setattr(u, "conv_out", torch.nn.Conv2d(16, 4, 3, padding=1))),
    ("dtype change (.to)", lambda u: u.to(torch.float64)),
]


def _processor() -> Any:
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def test_every_tracked_change_is_seen_and_agrees_with_the_full_fingerprint():
    unet = tiny_sd_unet()
    watch = ModelWatch(unet)
    try:
        for name, change in CHANGES:
            before = model_fingerprint(unet)
            assert not watch.changed(), f"before {name}: nothing changed yet"
            change(unet)
            assert model_fingerprint(unet) != before, f"{name}: the reference must see it"
            assert watch.changed(), f"{name}: not seen"
            watch.accept()
    finally:
        watch.close()


def test_changes_graphs_do_not_bake_in_are_not_reported():
    unet, other = tiny_sd_unet(), tiny_sd_unet()
    watch = ModelWatch(unet)
    try:
        before = model_fingerprint(unet)
        with torch.no_grad():
            unet.conv_in.weight.mul_(0.5)  # in place: the graphs read the same storage
        other.conv_out = torch.nn.Conv2d(16, 4, 3, padding=1)  # another model's registration
        unet.to(torch.float32)  # already float32: a no-op for the weights
        assert model_fingerprint(unet) == before
        # `.to` went through the wrapped `_apply`, so the watch asks for the fingerprint once, which
        # then finds nothing changed; only the registration elsewhere and the in-place copy are free.
        assert watch.changed()
        watch.accept()
        assert not watch.changed()
    finally:
        watch.close()


def test_ip_adapter_scales_edited_in_place_are_seen():
    """set_ip_adapter_scale writes into the processors' scale lists in place."""
    unet = tiny_sd_unet()
    attention = _first(unet, "set_processor")

    class Scaled:
        scale = [1.0]

    attention.set_processor(Scaled())
    watch = ModelWatch(unet)
    try:
        attention.processor.scale[0] = 0.5
        assert watch.changed()
    finally:
        watch.close()


def test_close_restores_the_unet_and_stops_counting():
    unet = tiny_sd_unet()
    before = dict(vars(unet))
    watch = ModelWatch(unet)
    wrapped = [name for name in WATCHED_METHODS if name in vars(unet)]
    assert "set_adapters" in wrapped and "_apply" in wrapped
    watch.close()
    assert vars(unet).keys() == before.keys()
    version = watch.version
    unet.conv_out = torch.nn.Conv2d(16, 4, 3, padding=1)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert watch.version == version


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_the_probe_reads_every_attention_module_and_block(preset):
    """The probe's lists cover the real architectures' attention modules and transformer blocks."""
    from diffusers import UNet2DConditionModel

    from bench.configs import unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(preset))
    watch = ModelWatch(unet)
    try:
        attention = [m for m in unet.modules() if hasattr(m, "set_processor")]
        blocks = [m for m in unet.modules() if hasattr(m, "set_chunk_feed_forward")]
        processors, _, _, chunks, _, _ = watch.probe()
        assert len(processors) == len(attention) and len(chunks) == len(blocks)
    finally:
        watch.close()
