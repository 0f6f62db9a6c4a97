"""The optional native part: CMakeLists.txt builds, the loader reports truthfully."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fastcache_imports_without_the_native_library(monkeypatch):
    from fastcache import native

    native._load.cache_clear()
    monkeypatch.setenv("FASTCACHE_NATIVE_LIB", "/nonexistent/libfastcache_native.so")
    try:
        assert not native.is_available()
        assert "build it with CMakeLists.txt" in native.load_error()
        with pytest.raises(RuntimeError):
            native.uniform_schedule(4, 2)
    finally:
        native._load.cache_clear()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_library_and_it_matches_python(tmp_path, monkeypatch):
    from fastcache import native
    from fastcache.schedule import UniformSchedule

    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    monkeypatch.setenv("FASTCACHE_NATIVE_LIB", str(build / "libfastcache_native.so"))
    native._load.cache_clear()
    try:
        assert native.is_available(), native.load_error()
        for interval in (1, 2, 3, 7):
            expected = [UniformSchedule(interval).is_refresh(step, 20) for step in range(20)]
            assert native.uniform_schedule(20, interval) == expected
    finally:
        native._load.cache_clear()
