"""The machine and software a run measured: recorded with every result file."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Any

import torch


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes competing for the CPU show up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    import fastcache

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU: {cpu_model()}"
    status = _git("status", "--porcelain", "--", "fastcache")
    return {
        "device": str(device),
        "device_name": device_name,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "triton": _version("triton"),
            "fastcache": fastcache.__version__,
            "DeepCache": _version("DeepCache"),
            "numpy": _version("numpy"),
        },
        "git_commit": _git("rev-parse", "HEAD"),
        # fastcache's sources differ from the commit (uncommitted changes) when this is true.
        "fastcache_dirty": bool(status) if status is not None else None,
    }
