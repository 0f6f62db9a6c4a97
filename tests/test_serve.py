"""``python -m fastcache serve`` with fastcache, as a real subprocess driven over HTTP.

One server for the module (tiny pipeline, dynamo with the eager backend, strict mode, batch sizes
1 and 4, an API key); the official ``openai`` client and ``requests`` talk to it. References: a
fresh in-process run of the same pipeline and settings (images), exact statuses and error bodies,
and the server's own metrics.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import openai
import pytest
import requests

from .serve_helpers import (
    GENERATIONS,
    OpenRequest,
    ServerProcess,
    assert_batch_tolerance,
    busy_worker,
    decode_png,
    fastcache_reference,
    gauge,
    metric,
    reference_image,
    wait_for,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key-0123456789"
FAULT = "please fail"
STEPS = 4  # DDIM, interval 3: steps 0 and 3 refresh, 1 and 2 are cached
MAX_CONNECTIONS = 32  # well above what the tests below hold open at once
FLAGS = [
    "--compile-backend", "eager", "--threads", "1", "--batch-sizes", "1,4", "--default-steps", str(STEPS),
    "--max-steps", "400", "--max-batch-delay-ms", "300", "--max-queue", "4", "--request-timeout", "300",
    "--max-body-bytes", "16384", "--body-timeout", "2", "--max-connections", str(MAX_CONNECTIONS), "--fault-prompt", FAULT,
]


@pytest.fixture(scope="module")
def server():
    process = ServerProcess(FLAGS, api_key=KEY).start()
    try:
        process.wait_ready(timeout=900)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def reference_pipe():
    with fastcache_reference() as pipe:
        yield pipe


def post(server: ServerProcess, body: dict | None = None, *, raw: bytes | None = None, key: str | None = KEY,
         headers: dict[str, str] | None = None) -> requests.Response:
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    return requests.post(server.url + GENERATIONS, data=raw if raw is not None else json.dumps(body),
                         headers=sent, timeout=600)


def in_threads(function, arguments: list) -> list[concurrent.futures.Future]:
    pool = concurrent.futures.ThreadPoolExecutor(len(arguments))
    futures = [pool.submit(function, argument) for argument in arguments]
    pool.shutdown(wait=False)
    return futures


def wait_queued(server: ServerProcess, depth: int) -> None:
    wait_for(lambda: gauge(server, "fastcache_serve_queue_depth") == depth, what=f"{depth} queued requests")


# -- the API with the reference client ------------------------------------------------------------
@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
def test_openai_client_gets_the_image_of_a_fresh_run(server, client, reference_pipe, negative_prompt):
    extra = {"seed": 42, "num_inference_steps": STEPS}
    if negative_prompt is not None:
        extra["negative_prompt"] = negative_prompt
    response = client.images.generate(prompt="a red fox in the snow", n=1, size="128x128",
                                      response_format="b64_json", extra_body=extra)
    assert response.created > 0 and len(response.data) == 1
    image = decode_png(response.data[0].b64_json)
    expected = reference_image(reference_pipe, "a red fox in the snow", 42, STEPS, negative_prompt)
    assert image.shape == (128, 128, 3)
    assert np.array_equal(image, expected), f"max diff {np.abs(image.astype(int) - expected).max()}"


def test_models_health_and_ready(server, client):
    assert [model.id for model in client.models.list().data] == ["fastcache-tiny-sd"]
    health = requests.get(server.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    ready = requests.get(server.url + "/ready", timeout=30)
    assert ready.status_code == 200
    assert ready.json()["warmed"] == ["128x128 batch 1", "128x128 batch 4"] and ready.json()["pending"] == []


def test_n_images_use_consecutive_seeds(server, client, reference_pipe):
    response = client.images.generate(prompt="a lighthouse", n=2, response_format="b64_json",
                                      extra_body={"seed": 7, "num_inference_steps": STEPS})
    assert [item.model_extra["seed"] for item in response.data] == [7, 8]
    for item, seed in zip(response.data, (7, 8)):  # a call of 2 images padded to the warmed 4
        assert_batch_tolerance(decode_png(item.b64_json), reference_image(reference_pipe, "a lighthouse", seed, STEPS))


# -- batching ---------------------------------------------------------------------------------------
def test_requests_that_can_share_run_as_one_padded_call_and_get_their_own_images(server, reference_pipe):
    before = server.metrics()
    prompts = [("a cat", 11), ("a dog", 12), ("a bird", 13)]
    with busy_worker(server):
        futures = in_threads(lambda item: post(server, {"prompt": item[0], "seed": item[1]}), prompts)
        wait_queued(server, 3)
    responses = [future.result() for future in futures]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert len({r.headers["x-fastcache-call"] for r in responses}) == 1  # one pipeline call...
    assert {r.headers["x-fastcache-batch"] for r in responses} == {"3/4"}  # ...of 3 images padded to 4
    after = server.metrics()
    assert metric(after, "fastcache_serve_padding_images_total") - metric(before, "fastcache_serve_padding_images_total") == 1
    for response, (prompt, seed) in zip(responses, prompts):
        alone = reference_image(reference_pipe, prompt, seed, STEPS)
        assert_batch_tolerance(decode_png(response.json()["data"][0]["b64_json"]), alone)
    assert metric(after, "fastcache_serve_compilations_since_warmup") == 0


def test_requests_that_cannot_share_run_in_arrival_order_and_a_full_queue_says_429(server):
    bodies = [  # x1, y1, z1, x2: x* share (same steps, no negative prompt); y1 and z1 share with nobody
        {"prompt": "x1", "seed": 1},
        {"prompt": "y1", "seed": 2, "num_inference_steps": STEPS + 1},
        {"prompt": "z1", "seed": 3, "negative_prompt": "ugly"},
        {"prompt": "x2", "seed": 4},
    ]
    with busy_worker(server):
        futures = []
        for depth, body in enumerate(bodies, start=1):  # one at a time, so arrival order is known
            futures += in_threads(lambda b: post(server, b), [body])
            wait_queued(server, depth)
        refused = post(server, {"prompt": "one too many"})  # --max-queue 4
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error" and "--max-queue 4" in refused.json()["error"]["message"]
    responses = [future.result() for future in futures]
    assert [r.status_code for r in responses] == [200] * 4
    x1, y1, z1, x2 = (int(r.headers["x-fastcache-call"]) for r in responses)
    assert x1 == x2 < y1 < z1
    assert responses[0].headers["x-fastcache-batch"] == "2/4" and responses[1].headers["x-fastcache-batch"] == "1/1"


# -- faults, disconnects, the event loop ---------------------------------------------------------------
def test_a_failing_call_fails_only_its_requests_and_the_next_one_is_a_fresh_runs_image(server, reference_pipe):
    before = metric(server.metrics(), "fastcache_serve_pipeline_failures_total")
    bodies = [{"prompt": FAULT, "seed": 5}, {"prompt": "same call", "seed": 6},
              {"prompt": "another call", "seed": 7, "num_inference_steps": STEPS + 1}]
    with busy_worker(server):
        futures = []
        for depth, body in enumerate(bodies, start=1):
            futures += in_threads(lambda b: post(server, b), [body])
            wait_queued(server, depth)
    failed, batched, other = (future.result() for future in futures)
    for response in (failed, batched):
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "pipeline_failed"
        assert "injected fault" in error["message"]
        assert response.headers["x-should-retry"] == "false"  # the openai client does not run it again
    assert other.status_code == 200
    assert np.array_equal(decode_png(other.json()["data"][0]["b64_json"]),
                          reference_image(reference_pipe, "another call", 7, STEPS + 1))
    after = post(server, {"prompt": "after the fault", "seed": 8})
    assert after.status_code == 200
    assert np.array_equal(decode_png(after.json()["data"][0]["b64_json"]),
                          reference_image(reference_pipe, "after the fault", 8, STEPS))
    assert metric(server.metrics(), "fastcache_serve_pipeline_failures_total") == before + 1


def test_client_disconnects_drop_queued_work_and_stop_abandoned_calls(server):
    before = server.metrics()
    with busy_worker(server):  # leaving it disconnects the blocker: nobody wants its call any more
        health = requests.get(server.url + "/health", timeout=30)  # the event loop answers during a call
        assert health.status_code == 200 and gauge(server, "fastcache_serve_running_requests") == 1
        waiting = OpenRequest(server, {"prompt": "never run", "seed": 9})
        wait_queued(server, 1)
        waiting.close()
        wait_for(lambda: gauge(server, "fastcache_serve_dropped_requests_total", reason="disconnected")
                 == metric(before, "fastcache_serve_dropped_requests_total", reason="disconnected") + 1,
                 what="the disconnected request to be dropped")
        assert gauge(server, "fastcache_serve_queue_depth") == 0
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("fastcache_serve_pipeline_calls_total", batch_size="1") == 1  # the blocker's; not the dropped one
    assert delta("fastcache_serve_interrupted_calls_total") == 1
    assert delta("fastcache_serve_discarded_results_total") == 1
    assert delta("fastcache_serve_requests_total", status="499") == 2


# -- metrics ----------------------------------------------------------------------------------------
def test_metrics_count_requests_steps_and_batches(server):
    before = server.metrics()
    assert post(server, {"prompt": "counted", "seed": 3}).status_code == 200
    assert post(server, {"prompt": ""}).status_code == 400
    assert post(server, {"prompt": "no key"}, key=None).status_code == 401
    response = requests.get(server.url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "_created" not in response.text  # no creation-time series beside every counter
    for status in ("429", "500", "503", "504"):  # each series exists before its first event (rate() works)
        assert f'fastcache_serve_requests_total{{status="{status}"}}' in response.text
    assert 'batching="true"' in response.text
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert [delta("fastcache_serve_requests_total", status=s) for s in ("200", "400", "401")] == [1, 1, 1]
    assert delta("fastcache_serve_request_latency_seconds_count") == 1
    assert delta("fastcache_serve_pipeline_calls_total", batch_size="1") == 1
    assert delta("fastcache_serve_batch_images_sum") == 1
    assert delta("fastcache_serve_unet_steps_total", kind="refresh") == 2
    assert delta("fastcache_serve_unet_steps_total", kind="cached") == 2
    assert metric(after, "fastcache_serve_queue_depth") == 0 and metric(after, "fastcache_serve_ready") == 1
    assert metric(after, "fastcache_serve_compilations_since_warmup") == 0
    assert metric(after, "process_resident_memory_bytes") > 0


# -- bad input -------------------------------------------------------------------------------------
BAD = [  # id, body (dict) or raw bytes, status, error type, param, a piece of the message
    ("missing prompt", {"n": 1}, 400, "invalid_request_error", "prompt", "required"),
    ("empty prompt", {"prompt": ""}, 400, "invalid_request_error", "prompt", "at least 1 character"),
    ("blank prompt", {"prompt": "   "}, 400, "invalid_request_error", "prompt", "prompt: prompt must not be blank"),
    ("prompt not a string", {"prompt": 5}, 400, "invalid_request_error", "prompt", "valid string"),
    ("n zero", {"prompt": "a", "n": 0}, 400, "invalid_request_error", "n", "between 1 and 4"),
    ("n above the largest batch", {"prompt": "a", "n": 5}, 400, "invalid_request_error", "n", "between 1 and 4"),
    ("n as a string", {"prompt": "a", "n": "2"}, 400, "invalid_request_error", "n", "valid integer"),
    ("size not served", {"prompt": "a", "size": "256x256"}, 400, "invalid_request_error", "size",
     "not served; this server warmed: 128x128"),
    ("size malformed", {"prompt": "a", "size": "large"}, 400, "invalid_request_error", "size",
     "'large' is not WIDTHxHEIGHT; this server warmed: 128x128 ('auto': 128x128)"),
    ("size in capitals", {"prompt": "a", "size": "128X128"}, 400, "invalid_request_error", "size",
     "is not WIDTHxHEIGHT"),
    ("steps zero", {"prompt": "a", "num_inference_steps": 0}, 400, "invalid_request_error", "num_inference_steps",
     "between 1 and 400, got 0"),
    ("steps above the maximum", {"prompt": "a", "num_inference_steps": 401}, 400, "invalid_request_error",
     "num_inference_steps", "between 1 and 400"),
    ("steps not an integer", {"prompt": "a", "num_inference_steps": 2.5}, 400, "invalid_request_error",
     "num_inference_steps", "valid integer"),
    ("guidance NaN", b'{"prompt": "a", "guidance_scale": NaN}', 400, "invalid_request_error", "guidance_scale",
     "finite number"),
    ("guidance infinite", b'{"prompt": "a", "guidance_scale": Infinity}', 400, "invalid_request_error",
     "guidance_scale", "finite number"),
    ("guidance a string", {"prompt": "a", "guidance_scale": "7"}, 400, "invalid_request_error", "guidance_scale",
     "valid number"),
    ("guidance without CFG", {"prompt": "a", "guidance_scale": 1.0}, 400, "invalid_request_error", "guidance_scale",
     "unwarmed shape"),
    ("guidance above 100", {"prompt": "a", "guidance_scale": 101.0}, 400, "invalid_request_error", "guidance_scale",
     "in (1, 100], got 101.0"),
    ("seed negative", {"prompt": "a", "seed": -1}, 400, "invalid_request_error", "seed",
     f"between 0 and {2**53 - 1} (2**53 - n"),
    ("seed + n - 1 past 2**53 - 1", {"prompt": "a", "seed": 2**53 - 2, "n": 3}, 400, "invalid_request_error", "seed",
     f"between 0 and {2**53 - 3} (2**53 - n"),
    ("stream", {"prompt": "a", "stream": True}, 400, "invalid_request_error", "stream", "streaming is not supported"),
    ("partial images", {"prompt": "a", "partial_images": 2}, 400, "invalid_request_error", "partial_images",
     "needs streaming"),
    ("transparent background", {"prompt": "a", "background": "transparent"}, 400, "invalid_request_error",
     "background", "use 'auto' or 'opaque'"),
    ("output_format jpeg", {"prompt": "a", "output_format": "jpeg"}, 400, "invalid_request_error", "output_format",
     "only 'png' is produced"),
    ("output_compression", {"prompt": "a", "output_compression": 80}, 400, "invalid_request_error",
     "output_compression", "lossless PNG only"),
    ("an animation", {"prompt": "a", "frame_count": 8}, 400, "invalid_request_error", "frame_count",
     "still PNG images only"),
    ("response_format url", {"prompt": "a", "response_format": "url"}, 400, "invalid_request_error",
     "response_format", "'url' is not supported"),
    ("response_format unknown", {"prompt": "a", "response_format": "jpeg"}, 400, "invalid_request_error",
     "response_format", "'b64_json' or 'url'"),
    ("unknown parameter", {"prompt": "a", "num_inference_step": 3}, 400, "invalid_request_error",
     "num_inference_step", "unknown parameter"),
    ("malformed JSON", b'{"prompt": ', 400, "invalid_request_error", None, "not valid JSON"),
    ("not UTF-8", b'{"prompt": "\xff"}', 400, "invalid_request_error", None, "must be UTF-8"),
    ("not a JSON object", b'["a", "b"]', 400, "invalid_request_error", None, "must be a JSON object"),
    ("unknown model", {"prompt": "a", "model": "dall-e-3"}, 404, "invalid_request_error", "model",
     "serves 'fastcache-tiny-sd'"),
    ("oversized body", {"prompt": "a" * 20000}, 413, "invalid_request_error", None, "larger than 16384 bytes"),
]


@pytest.mark.parametrize("body, status, kind, param, fragment", [case[1:] for case in BAD], ids=[c[0] for c in BAD])
def test_bad_input_gets_an_openai_error(server, body, status, kind, param, fragment):
    response = post(server, raw=body) if isinstance(body, bytes) else post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["param"] == param
    assert fragment in error["message"], error["message"]
    assert "Value error" not in error["message"]  # pydantic's prefix, not words for a user


def test_the_openai_fields_that_change_nothing_give_the_same_image(server, client):
    """What the openai client may send besides our fields (its Optional n, size 'auto', the
    moderation and safety fields, the values asking for what this server does anyway) is accepted,
    and the image is the one of the request without them."""
    extra = {"seed": 21, "num_inference_steps": STEPS}
    plain = client.images.generate(prompt="a kite", response_format="b64_json", extra_body=extra)
    dressed = client.images.generate(
        prompt="a kite", n=None, size="auto", response_format="b64_json", quality="high", style="vivid",
        moderation="auto", background="opaque", output_format="png", output_compression=100, stream=False,
        safety_identifier="user-1", user="user-1", extra_body={**extra, "partial_images": 0, "complexity": "low"})
    assert [item.model_extra["seed"] for item in dressed.data] == [21]
    assert dressed.data[0].b64_json == plain.data[0].b64_json


def test_a_model_is_retrieved_by_its_id(server, client):
    card = client.models.retrieve("fastcache-tiny-sd")
    assert card.id == "fastcache-tiny-sd" and card.owned_by == "fastcache" and card.created > 0
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("dall-e-3")
    assert missing.value.body["code"] == "model_not_found" and "fastcache-tiny-sd" in missing.value.body["message"]


def test_a_stalled_body_gets_408_and_frees_its_connection(server):
    """A client that declares a body and stops sending gets 408 after --body-timeout (2 s here)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as connection:
        connection.sendall(f"POST {GENERATIONS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                           "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\"".encode())
        started = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert 1.5 <= time.monotonic() - started < 30
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert "--body-timeout" in json.loads(body)["error"]["message"]


def test_connections_past_max_connections_get_503_until_some_close(server):
    """Idle connections count (a client that connects and sends nothing holds a file descriptor):
    with --max-connections of them open, a request gets 503 and its connection is closed; once
    they close, requests are served again."""
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)  # the server accepts them in order, before the request below
        refused = requests.get(server.url + "/health", timeout=60)
        assert refused.status_code == 503 and refused.text == "Service Unavailable"
        assert refused.headers["connection"] == "close"
    finally:
        for connection in idle:
            connection.close()
    wait_for(lambda: requests.get(server.url + "/health", timeout=60).status_code == 200, timeout=30)


def test_a_streamed_oversized_body_gets_413(server):
    chunks = (b'{"prompt": "' if i == 0 else b"a" * 1024 for i in range(40))  # no Content-Length: chunked
    response = requests.post(server.url + GENERATIONS, data=chunks, timeout=60,
                             headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 413
    assert "larger than 16384 bytes" in response.json()["error"]["message"]


def test_unknown_paths_and_methods_get_openai_errors(server):
    missing = requests.get(server.url + "/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    wrong = requests.get(server.url + GENERATIONS, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert wrong.status_code == 405 and wrong.json()["error"]["message"] == "Method Not Allowed"


def test_openai_client_raises_the_servers_errors(server, client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a", size="64x64", response_format="b64_json")
    assert bad.value.status_code == 400 and bad.value.body["param"] == "size"
    wrong_key = openai.OpenAI(base_url=server.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong_key.images.generate(prompt="a")
    assert denied.value.status_code == 401 and denied.value.body["code"] == "invalid_api_key"


# -- security -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Bearer {KEY}x", f"Basic {KEY}", KEY],
                         ids=["missing", "wrong", "longer", "not bearer", "no scheme"])
def test_api_key_is_required_on_v1(server, authorization):
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    for method, path in (("post", GENERATIONS), ("get", "/v1/models")):
        response = requests.request(method, server.url + path, data=json.dumps({"prompt": "a"}), headers=headers,
                                    timeout=30)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"


def _outward_address() -> str:
    """This machine's address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def test_probes_and_metrics_need_no_key_and_the_server_binds_loopback(server):
    for path in ("/health", "/ready", "/metrics"):
        assert requests.get(server.url + path, timeout=30).status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json"):  # the API pages: not on a server with a key
        assert requests.get(server.url + path, timeout=30).status_code == 404
    address = _outward_address()
    if address.startswith("127."):
        pytest.skip("this machine has no address but loopback")
    with pytest.raises(requests.ConnectionError):  # not listening there: --host defaults to 127.0.0.1
        requests.get(f"http://{address}:{server.port}/health", timeout=10)


def test_the_load_test_drives_a_running_server_with_url(server, tmp_path):
    command = [sys.executable, "-m", "bench", "serve-load", "--url", server.url, "--api-key", KEY, "--label",
               "smoke-url", "--steps", str(STEPS), "--concurrency", "1,2", "--requests", "3", "--open-requests", "3",
               "--out", str(tmp_path)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    [name] = [n for n in os.listdir(tmp_path) if n.startswith("serve-load-smoke-url-") and n.endswith(".json")]
    with open(tmp_path / name) as handle:
        result = json.load(handle)
    assert list(result["servers"]) == ["target"] and result["meta"]["url"] == server.url
    assert [(p["phase"], p["ok"], p["errors"]) for p in result["servers"]["target"]["phases"]][:2] == [
        ("closed c=1", 3, 0), ("closed c=2", 3, 0)]


def test_nothing_compiled_after_warmup(server):
    """Strict mode, and every request of this module at a warmed shape: the count stays 0."""
    metrics = server.metrics()
    assert metric(metrics, "fastcache_serve_requests_total", status="200") >= 10
    assert metric(metrics, "fastcache_serve_compilations_since_warmup") == 0
