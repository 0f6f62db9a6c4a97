"""The engine's own answers, without a server or a pipeline: what Retry-After estimates, and when
liveness says the process must restart. References: the formulas written out by hand."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")

from fastcache.serve.batcher import Job  # noqa: E402
from fastcache.serve.config import ServeConfig  # noqa: E402
from fastcache.serve.engine import Engine  # noqa: E402


def _engine(**settings) -> Engine:
    return Engine(ServeConfig(accelerator="none", batch_sizes=(1, 4), **settings))


def test_retry_after_counts_the_queued_images_in_full_calls():
    engine = _engine()
    engine._call_seconds = 0.8
    for _ in range(3):  # three requests of n=4: three calls of 4 images, not one
        engine.batcher.submit(Job(key="k", images=4, deadline=time.monotonic() + 60, payload=None))
    assert engine.retry_after() == 4  # ceil((1 running + 12 images / 4 per call) * 0.8 s) = ceil(3.2)
    engine.batcher.submit(Job(key="k", images=1, deadline=time.monotonic() + 60, payload=None))
    assert engine.retry_after() == 4  # 13 images: 4 calls ahead plus the running one, 5 * 0.8 s


def test_liveness_fails_for_a_call_running_past_twice_the_request_timeout():
    engine = _engine(request_timeout=10.0)
    assert engine.health_problem() is None
    now = time.monotonic()
    engine._call_started = now - 19.0
    assert engine.health_problem(now) is None  # long, but its requests may still be stopping it
    engine._call_started = now - 21.0
    problem = engine.health_problem(now)
    assert problem is not None and "run 21 s" in problem and "--request-timeout (10 s)" in problem
    engine._call_started = None
    engine.state, engine.failure = "failed", "the accelerator can no longer serve"
    assert engine.health_problem() == "the accelerator can no longer serve"
