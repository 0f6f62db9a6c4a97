"""``--model FOLDER``: a diffusers folder (here the tiny SDXL pipeline, saved with save_pretrained)
loaded with from_pretrained, served with fastcache and TGATE (``--gate-step``): SDXL's two text
encoders, pooled embeddings and ``text_time`` conditions through the same server, batching
included, and TGATE's unguided half batch after the gate. References: fresh in-process runs with
the same accelerate options, eagerly (TGATE itself against the tgate package: test_tgate.py)."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import requests

from fastcache.tiny import tiny_sdxl_pipeline

from .helpers import accelerated

from .serve_helpers import (
    GENERATIONS,
    ServerProcess,
    assert_batch_tolerance,
    busy_worker,
    decode_png,
    gauge,
    reference_image,
    wait_for,
)

STEPS = 5  # Euler, interval 3, gate 3: a refresh and a cached step guided, the re-arm refresh at
GATE = 3   # gate - 1 (storing the cross-attention means), then unguided: a refresh and a cached step
OPTIONS = dict(cache_interval=3, cache_branch_id=0, compile=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(folder):
    process = ServerProcess(["--model", str(folder), "--compile-backend", "eager", "--threads", "1",
                             "--batch-sizes", "1,2", "--default-steps", str(STEPS), "--max-steps", "400",
                             "--gate-step", str(GATE)]).start()
    try:
        process.wait_ready(timeout=900)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def reference_pipe(folder):
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_an_sdxl_folder_is_served_with_its_name_and_native_size(server):
    models = requests.get(server.url + "/v1/models", timeout=30).json()
    assert [model["id"] for model in models["data"]] == ["tiny-sdxl"]
    assert requests.get(server.url + "/ready", timeout=30).json()["warmed"] == ["128x128 batch 1", "128x128 batch 2"]


@pytest.mark.parametrize("negative_prompt", [None, "fog"])
def test_sdxl_requests_alone_and_batched_get_a_fresh_runs_images(server, reference_pipe, negative_prompt):
    bodies = [{"prompt": prompt, "seed": seed, "model": "tiny-sdxl"} for prompt, seed in (("a boat", 31), ("a bridge", 32))]
    if negative_prompt is not None:
        for body in bodies:
            body["negative_prompt"] = negative_prompt
    alone = requests.post(server.url + GENERATIONS, json=bodies[0], timeout=600)
    assert alone.status_code == 200 and alone.headers["x-fastcache-batch"] == "1/1"
    with accelerated(reference_pipe, gate_step=GATE, **OPTIONS):
        expected = [reference_image(reference_pipe, b["prompt"], b["seed"], STEPS, negative_prompt) for b in bodies]
    assert np.array_equal(decode_png(alone.json()["data"][0]["b64_json"]), expected[0])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with busy_worker(server):  # both queue behind it, then share one call
            futures = [pool.submit(requests.post, server.url + GENERATIONS, json=body, timeout=600) for body in bodies]
            wait_for(lambda: gauge(server, "fastcache_serve_queue_depth") == 2, what="both requests to queue")
        batched = [future.result() for future in futures]
    assert [r.headers["x-fastcache-batch"] for r in batched] == ["2/2", "2/2"]
    for response, reference in zip(batched, expected):
        assert_batch_tolerance(decode_png(response.json()["data"][0]["b64_json"]), reference)
    assert gauge(server, "fastcache_serve_compilations_since_warmup") == 0


def test_tgate_runs_after_the_gate_and_a_shorter_request_runs_plain_fastcache(server, reference_pipe):
    """At STEPS the server's image is TGATE's, not plain fastcache's; at GATE - 1 steps (no call
    past the gate) it is plain fastcache's. Neither compiles anything after warm-up (strict)."""
    def served(steps: int) -> np.ndarray:
        body = {"prompt": "a lighthouse", "seed": 7, "num_inference_steps": steps}
        response = requests.post(server.url + GENERATIONS, json=body, timeout=600)
        assert response.status_code == 200, response.text
        return decode_png(response.json()["data"][0]["b64_json"])

    with accelerated(reference_pipe, gate_step=GATE, **OPTIONS):
        tgate = reference_image(reference_pipe, "a lighthouse", 7, STEPS)
        short = reference_image(reference_pipe, "a lighthouse", 7, GATE - 1)
    with accelerated(reference_pipe, **OPTIONS):
        plain = reference_image(reference_pipe, "a lighthouse", 7, STEPS)
        plain_short = reference_image(reference_pipe, "a lighthouse", 7, GATE - 1)
    assert np.array_equal(short, plain_short)
    # The tiny model's random weights make guidance a small effect on its pixels, but a server
    # that ignored --gate-step would fail the exact comparisons below.
    assert not np.array_equal(tgate, plain), "TGATE should change this image"
    assert np.array_equal(served(STEPS), tgate)
    assert np.array_equal(served(GATE - 1), plain_short)
    assert gauge(server, "fastcache_serve_compilations_since_warmup") == 0
