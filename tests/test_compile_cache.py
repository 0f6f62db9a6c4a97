"""save_compile_cache / load_compile_cache: a restarted process compiles nothing and gives the same
latents; bad files are reported and never raise.

The restart test runs two fresh processes (tests/compile_cache_worker.py), each with its own empty
TORCHINDUCTOR_CACHE_DIR: the first compiles cold and saves the file, the second loads it. About a
minute on 2 CPU cores, most of it the first process's cold inductor compile of a two-level U-Net.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys

import pytest
import torch

import fastcache
from fastcache import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path, monkeypatch):
    """In-process loads write into (and may re-point TORCHINDUCTOR_CACHE_DIR at) this test's folders only."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _run_worker(cache_dir, out, *args: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    os.makedirs(out, exist_ok=True)
    completed = subprocess.run(
        [sys.executable, "-m", "tests.compile_cache_worker", "--out", str(out), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    with open(os.path.join(out, "report.json")) as file:
        report = json.load(file)
    report["latents"] = torch.load(os.path.join(out, "latents.pt"))
    return report


@pytest.fixture(scope="module")
def restart(tmp_path_factory):
    """(cold process's report, restarted process's report, cache file, second cache dir)."""
    root = tmp_path_factory.mktemp("compile-cache")
    path = root / "fastcache.compile-cache"
    cold = _run_worker(root / "inductor-1", root / "out-1", "--save", str(path))
    warm = _run_worker(root / "inductor-2", root / "out-2", "--load", str(path))
    return cold, warm, path, root / "inductor-2"


def test_restart_from_file_compiles_nothing_and_gives_the_same_latents(restart):
    cold, warm, path, cache_dir = restart
    # The first process compiled both graphs (full, shallow) from scratch and saved them.
    assert cold["counters"]["inductor"].get("fxgraph_cache_miss", 0) == 2
    assert cold["save"]["loaded"] and cold["save"]["artifacts"]["inductor"] == 2
    assert cold["save"]["artifacts"]["cpp_kernel_files"] > 0
    # The second, with an empty cache directory, found everything in the file.
    assert warm["load"]["loaded"], warm["load"]["reason"]
    aot, inductor = warm["counters"]["aot_autograd"], warm["counters"]["inductor"]
    assert aot.get("autograd_cache_hit", 0) == 2 and aot.get("autograd_cache_miss", 0) == 0, aot
    assert inductor.get("fxgraph_cache_hit", 0) == 2 and inductor.get("fxgraph_cache_miss", 0) == 0, inductor
    # ...and built no C++ kernel: every shared object in its cache directory came from the file.
    with open(path, "rb") as file:
        file.readline()
        bundled = {name for name, _ in json.loads(file.readline())["kernels"]}
    built = {os.path.relpath(os.path.join(folder, name), cache_dir).replace(os.sep, "/")
             for folder, _, names in os.walk(cache_dir) for name in names if name.endswith(".so")}
    assert built and built <= bundled, sorted(built - bundled)[:5]
    # Restored 0644 (umask 022): the loader needs no execute bit, nobody else may change them.
    modes = {name: stat.S_IMODE(os.stat(os.path.join(cache_dir, name)).st_mode) for name in bundled}
    assert all(mode & 0o133 == 0 for mode in modes.values()), {n: oct(m) for n, m in modes.items() if m & 0o133}
    # Same generated code, same kernels: the same latents, bit for bit (tolerance 0).
    assert torch.equal(warm["latents"], cold["latents"])


def _write(path, header: dict, body: bytes) -> None:
    with open(path, "wb") as file:
        file.write(compile_cache.MAGIC + json.dumps(header).encode() + b"\n" + body)


def _header(**overrides) -> dict:
    header = {"format": compile_cache.FORMAT_VERSION, "environment": compile_cache.environment(),
              "torch_bytes": 4, "kernels": []}
    header.update(overrides)
    return header


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("missing", None, "no compile cache file at"),
        ("garbage", b"\x00\x01 not a cache", "is not a fastcache compile cache file"),
        ("bad-header", compile_cache.MAGIC + b"{not json\n", "unreadable header"),
        ("truncated", (_header(), b"ab"), "truncated or damaged"),
        ("other-torch", (_header(environment={**compile_cache.environment(), "torch": "1.0"}), b"abcd"),
         "torch '1.0'"),
        ("escaping-kernel", (_header(kernels=[["../x.so", 1]]), b"abcdX"), "outside the cache directory"),
        ("torch-garbage", (_header(), b"abcd"), "torch could not"),
    ],
)
def test_a_bad_file_is_reported_and_never_raises(tmp_path, caplog, name, content, reason):
    path = tmp_path / name
    if isinstance(content, tuple):
        _write(path, *content)
    elif content is not None:
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="fastcache"):
        report = fastcache.load_compile_cache(path)
    assert not report and not report.loaded
    assert reason in report.reason, report.reason
    assert "compile from scratch" in caplog.text


def test_saving_before_anything_compiled_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    with pytest.raises(fastcache.CompileCacheError, match="after fastcache's warmup"):
        fastcache.save_compile_cache(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_warm_restart_report_gives_ratios_against_cold():
    from bench.warm_restart import markdown

    def row(mode: str, first: float) -> dict:
        return {"run": 1, "mode": mode, "process_s": first + 10, "process_cpu_s": first + 5, "import_s": 1.0,
                "build_s": 2.0, "load_s": 0.5 if mode == "restart-file" else 0.0, "accelerate_warmup_s": first - 1,
                "first_image_s": 1.0, "to_first_image_s": first, "dynamo_s": 3.0, "backend_s": first - 5,
                "fxgraph_cache": {"fxgraph_cache_hit": 2}, "aot_autograd_cache": {"autograd_cache_hit": 2},
                "save": {"size_bytes": 1e6, "artifacts": {"inductor": 2}, "seconds": 0.1} if mode == "cold" else None}

    env = {"device_name": "CPU: test", "cpu_count": 2, "versions": {"torch": "x", "diffusers": "y", "fastcache": "z"},
           "git_commit": "abc", "fastcache_dirty": False, "load_average_at_start": [0.0]}
    meta = {"preset": "tiny", "shape": "128x128 b1", "config": "I3B0", "command": "python -m bench warm-restart",
            "steps": 2, "dtype": "fp32", "runs": 1, "load_average_at_end": [0.0], "environment": env}
    text = markdown({"meta": meta, "rows": [row("cold", 60.0), row("restart-dir", 10.0), row("restart-file", 12.0)]})
    assert "| restart-dir | 10.00 | 6.0x |" in text
    assert "| restart-file | 12.00 | 5.0x |" in text
