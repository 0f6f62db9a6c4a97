"""``--compile-cache FILE`` with inductor: the first server writes the file after warm-up, a second
one with an empty inductor cache directory loads it before warm-up, leaves it as it was, and
serves the same image. Slow: real inductor compiles (the first server reuses the machine's
inductor cache directory when other tests filled it; the second starts from an empty one)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import requests

from .serve_helpers import GENERATIONS, ServerProcess, decode_png, metric

pytestmark = pytest.mark.slow

FLAGS = ["--threads", "1", "--batch-sizes", "1", "--default-steps", "4"]
REQUEST = {"prompt": "a compiled fox", "seed": 21}


def serve_once(flags: list[str], env: dict[str, str] | None = None) -> tuple[dict, np.ndarray]:
    """Start, take the metrics and one image, stop (status 0)."""
    server = ServerProcess(flags, env=env or {}).start()
    try:
        server.wait_ready(timeout=1800)
        response = requests.post(server.url + GENERATIONS, json=REQUEST, timeout=600)
        assert response.status_code == 200, response.text
        metrics = server.metrics()
    finally:
        status = server.stop()
    assert status == 0, server.log_tail()
    return metrics, decode_png(response.json()["data"][0]["b64_json"])


def test_compile_cache_is_written_after_warmup_then_loaded_before_it(tmp_path):
    path = tmp_path / "tiny.fastcache-cache"
    first, image = serve_once(FLAGS + ["--compile-cache", str(path)])
    assert metric(first, "fastcache_serve_compile_cache_loaded") == 0
    assert metric(first, "fastcache_serve_compile_cache_saved") == 1 and path.stat().st_size > 0
    written = (path.stat().st_size, path.stat().st_mtime_ns)

    empty = tmp_path / "inductor-cache"
    empty.mkdir()
    second, again = serve_once(FLAGS + ["--compile-cache", str(path)], env={"TORCHINDUCTOR_CACHE_DIR": str(empty)})
    assert metric(second, "fastcache_serve_compile_cache_loaded") == 1
    assert metric(second, "fastcache_serve_compile_cache_saved") == 0  # a file was there: left as it was
    assert (path.stat().st_size, path.stat().st_mtime_ns) == written
    assert os.listdir(empty)  # the file's entries and kernels went into the empty cache directory
    assert metric(second, "fastcache_serve_compilations_since_warmup") == 0
    assert np.array_equal(image, again)
