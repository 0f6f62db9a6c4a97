"""`python -m fastcache demo` end to end (eager, few steps), and its output files."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from fastcache import __main__ as cli
from fastcache.demo import psnr


def test_demo_runs_and_writes_images(tmp_path, capsys):
    code = cli.main(["demo", "--steps", "4", "--repeats", "1", "--no-compile", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    for name in ("plain.png", "deepcache.png", "fastcache.png"):
        assert os.path.getsize(tmp_path / name) > 0
    fastcache_line = next(line for line in out.splitlines() if line.startswith("fastcache vs DeepCache"))
    assert float(fastcache_line.split("max |diff| ")[1].split()[0]) <= 1e-5  # images in [0, 1]
    assert "plain diffusers" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("plain", "DeepCache", "fastcache "))}
    low, high = (float(x) for x in rows["plain"][3].split("-"))  # "plain diffusers <median> <min>-<max>"
    assert low <= float(rows["plain"][2]) <= high
    assert "load average" in out


def test_psnr_reference_values():
    a = np.zeros((4, 4, 3))
    assert psnr(a, a) == float("inf")
    assert abs(psnr(a, a + 0.1) - 20.0) < 1e-9  # mse 0.01 -> 10 log10(1 / 0.01)


def test_cli_help_lists_demo():
    result = subprocess.run([sys.executable, "-m", "fastcache", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout


def test_demo_with_a_gate_step_adds_the_tgate_row(tmp_path, capsys):
    """--gate-step runs fastcache with TGATE too (its equality with the tgate package is
    tests/test_tgate.py's): a row of its own, and an image of its own that TGATE changed."""
    code = cli.main(["demo", "--steps", "4", "--repeats", "1", "--no-compile", "--gate-step", "2", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("fastcache+TGATE 2 "))
    assert float(row.split()[5]) > 0  # max |diff| vs plain
    assert "--gate-step 10 adds" not in out
    from PIL import Image

    tgate, fast = (np.asarray(Image.open(tmp_path / name), dtype=np.int16) for name in ("fastcache-tgate.png", "fastcache.png"))
    assert np.abs(tgate - fast).max() > 0
