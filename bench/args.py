"""Argument types and defaults shared by bench's commands (run, restart-probe, warm-restart,
profile); importing nothing from those commands, so that none of them imports another's module
for a parser helper."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def ints(text: str) -> list[int]:
    """``1,4,8``."""
    return [int(part) for part in text.split(",") if part.strip()]


def sizes(text: str) -> list[tuple[int, int]]:
    """``512,768`` (square) or ``768x512`` (width x height) entries."""
    result = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        width, _, height = part.lower().partition("x")
        result.append((int(width), int(height or width)))
    return result


def option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE read as JSON where it parses (true, 3, {...}), else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def tweaks(text: str) -> tuple[str, ...]:
    """``fuse_qkv,channels_last``: U-Net changes every method gets alike (bench/tweaks.py)."""
    from .tweaks import parse_tweaks

    try:
        return parse_tweaks(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cuda_graphs(text: str) -> bool | None:
    """``auto`` / ``on`` / ``off`` as fastcache's ``cuda_graphs`` (None, True, False)."""
    return {"auto": None, "on": True, "off": False}[text]


def torch_dtype(name: str, device: Any) -> Any:
    """``auto`` (fp16 on CUDA, fp32 elsewhere), ``fp16``, ``bf16`` or ``fp32`` as a torch dtype."""
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
