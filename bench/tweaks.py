"""U-Net changes applied to every method's pipeline alike (``--unet-tweaks``).

They measure optimisations that live in diffusers or torch rather than in fastcache, with every
method (eager, compile, DeepCache, fastcache) run on the same tweaked model, so their effect on
each is visible in one run:

* ``fuse_qkv``: diffusers' ``unet.fuse_qkv_projections()`` (one GEMM for self-attention's q, k, v
  and one for cross-attention's k, v; FusedAttnProcessor2_0). It keeps the unfused weights too.
* ``channels_last``: the U-Net's weights in the channels-last memory format (inductor already
  picks channels-last for convolution-heavy graphs on CUDA; eager and DeepCache do not).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _fuse_qkv(pipe: Any) -> None:
    pipe.unet.fuse_qkv_projections()


def _channels_last(pipe: Any) -> None:
    pipe.unet.to(memory_format=torch.channels_last)


TWEAKS: dict[str, Callable[[Any], None]] = {"fuse_qkv": _fuse_qkv, "channels_last": _channels_last}


def parse_tweaks(text: str | None) -> tuple[str, ...]:
    """``fuse_qkv,channels_last`` -> the names, checked; empty or None -> none."""
    names = tuple(part.strip() for part in (text or "").split(",") if part.strip())
    unknown = sorted(set(names) - set(TWEAKS))
    if unknown:
        raise ValueError(f"unknown U-Net tweak(s) {unknown}; choose from {sorted(TWEAKS)}")
    return names


def apply_tweaks(pipe: Any, names: tuple[str, ...]) -> None:
    for name in names:
        TWEAKS[name](pipe)
