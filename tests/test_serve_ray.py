"""Scale-out: ``python -m fastcache serve --replicas 2`` puts two replicas of the same app behind
Ray Serve's proxy, on CPU here (one CPU each, the tiny pipeline). Slow: a Ray instance and two
replica processes start, each loading and warming its own pipeline."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import openai
import pytest
import requests

from .serve_helpers import GENERATIONS, ServerProcess, decode_png, fastcache_reference, reference_image

pytestmark = pytest.mark.slow

STEPS = 4
FLAGS = ["--replicas", "2", "--replica-cpus", "1", "--threads", "1", "--compile-backend", "eager",
         "--batch-sizes", "1", "--default-steps", str(STEPS)]


def replicas_answering(url: str, tries: int = 16) -> set[str]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = pool.map(lambda _: requests.get(url + "/health", timeout=30).json()["replica"], range(tries))
        return set(answers)


def test_two_ray_serve_replicas_serve_the_same_api_and_images():
    server = ServerProcess(FLAGS).start()
    try:
        server.wait_ready(timeout=900)
        deadline = time.monotonic() + 300
        while len(replicas_answering(server.url)) < 2:  # Ray routes to each replica once it is warmed
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(1)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
        prompts = [(f"a castle on a hill {i}", 100 + i) for i in range(6)]

        def generate(item):
            prompt, seed = item
            raw = client.images.with_raw_response.generate(
                prompt=prompt, response_format="b64_json", extra_body={"seed": seed, "num_inference_steps": STEPS})
            return raw.headers["x-fastcache-replica"], decode_png(raw.parse().data[0].b64_json)

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(generate, prompts))
        assert len({replica for replica, _ in results}) == 2  # Ray's router used both replicas
        with fastcache_reference() as pipe:
            for (prompt, seed), (_, image) in zip(prompts, results):
                assert np.array_equal(image, reference_image(pipe, prompt, seed, STEPS))
        refused = requests.post(server.url + GENERATIONS, json={"prompt": "a", "size": "64x64"}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "size"
        assert [m.id for m in client.models.list().data] == ["fastcache-tiny-sd"]
    finally:
        status = server.stop(timeout=300)
    assert status == 0, server.log_tail()
