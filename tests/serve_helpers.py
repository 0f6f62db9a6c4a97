"""Helpers of the server tests: the server subprocess, a fresh in-process reference run, image
comparison, and a request that keeps the worker busy until released.

Servers run with ``--threads 1`` and the references with one torch thread: the same kernels on
the same thread count give the same bits, and two spinning OpenMP threads per process are slow
on a shared 2-core machine.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import socket
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from bench.serve_load import ServerProcess, metric  # noqa: F401 - re-exported for the tests

GENERATIONS = "/v1/images/generations"

# Batched vs alone: the same latents (one generator per image), so the only differences are the
# float rounding of batch-size-dependent CPU kernels (oneDNN convolution and GEMM blocking, about
# 1e-6 relative), which moves a value across an 8-bit rounding boundary now and then. Measured on
# the tiny pipeline: at most 1 level of 255, on 0.002-0.008% of the values (batch 4 vs batch 1).
BATCH_MAX_LEVELS = 1
BATCH_MAX_FRACTION = 0.005


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def assert_batch_tolerance(batched: np.ndarray, alone: np.ndarray) -> None:
    difference = np.abs(batched.astype(np.int16) - alone.astype(np.int16))
    fraction = float((difference > 0).mean())
    assert difference.max() <= BATCH_MAX_LEVELS and fraction <= BATCH_MAX_FRACTION, (
        f"batched vs alone: max {difference.max()} levels, {fraction:.4%} of values differ")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def fastcache_reference() -> Iterator[Any]:
    """The servers' default pipeline and fastcache settings, in this process, with the split run
    eagerly (the servers' dynamo + eager backend runs the same ops: bit-identical)."""
    import fastcache
    from fastcache.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    handle = fastcache.accelerate(pipe, cache_interval=3, cache_branch_id=0, compile=False)
    try:
        yield pipe
    finally:
        handle.disable()


def reference_image(pipe: Any, prompt: str, seed: int, steps: int, negative_prompt: str | None = None,
                    guidance_scale: float = 7.5, size: tuple[int, int] = (128, 128)) -> np.ndarray:
    """What the server's engine runs for one request alone, in this process: a fresh call."""
    with one_thread():
        image = pipe(
            prompt=[prompt], negative_prompt=None if negative_prompt is None else [negative_prompt],
            num_inference_steps=steps, guidance_scale=guidance_scale, width=size[0], height=size[1],
            generator=[torch.Generator("cpu").manual_seed(seed)], output_type="pil",
        ).images[0]
    return np.asarray(image.convert("RGB"))


def wait_for(condition: Callable[[], bool], timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def gauge(server: ServerProcess, name: str, **labels: str) -> float:
    return metric(server.metrics(), name, **labels)


class OpenRequest:
    """A POST sent on its own connection, answered or abandoned later (`close()` disconnects)."""

    def __init__(self, server: ServerProcess, body: dict[str, Any]) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=900)
        headers = {"Content-Type": "application/json", **server.headers}
        self.connection.request("POST", GENERATIONS, body=json.dumps(body), headers=headers)

    def response(self) -> tuple[int, dict[str, str], dict[str, Any]]:
        answer = self.connection.getresponse()
        status, headers, data = answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        self.connection.close()
        return status, headers, json.loads(data) if data else {}

    def close(self) -> None:
        """Disconnect without reading the answer (the server sees the client go)."""
        with contextlib.suppress(OSError):
            self.connection.sock.shutdown(socket.SHUT_RDWR)
        self.connection.close()


@contextlib.contextmanager
def busy_worker(server: ServerProcess, steps: int = 400) -> Iterator[OpenRequest]:
    """A long request that occupies the worker: what is sent meanwhile queues. Leaving the block
    disconnects it, so the server interrupts its call at the next step."""
    running = gauge(server, "fastcache_serve_running_requests")
    assert running == 0, "the worker is not idle"
    blocker = OpenRequest(server, {"prompt": "blocker", "num_inference_steps": steps, "seed": 1})
    try:
        wait_for(lambda: gauge(server, "fastcache_serve_running_requests") == 1, what="the blocker to run")
        yield blocker
    finally:
        blocker.close()
    wait_for(lambda: gauge(server, "fastcache_serve_running_requests") == 0
             and gauge(server, "fastcache_serve_queue_depth") == 0, what="the worker to be idle again")
