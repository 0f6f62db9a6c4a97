"""The server's life: 503 until warmed, a request past its timeout dropped unrun, SIGTERM draining.

One server for the module, plain diffusers behind it (``--accelerator none``: the lifecycle is the
engine's and the batcher's, not the accelerator's, and it starts fastest). Its batch wait is long
(60 s): a request alone waits for partners until its deadline, which is how the timeout test
keeps a request queued without timing anything. The SIGTERM test ends the server, so it is last.
"""

from __future__ import annotations

import signal
import time

import pytest
import requests

from .serve_helpers import GENERATIONS, OpenRequest, ServerProcess, gauge, metric, wait_for

TIMEOUT_S = 12
FLAGS = ["--accelerator", "none", "--threads", "1", "--batch-sizes", "1,2", "--default-steps", "4",
         "--max-batch-delay-ms", "60000", "--request-timeout", str(TIMEOUT_S)]


@pytest.fixture(scope="module")
def server():
    """The server, and what /ready and an image request answered before it was ready."""
    process = ServerProcess(FLAGS).start()
    early = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert process.process.poll() is None, process.log_tail()
            try:
                ready = requests.get(process.url + "/ready", timeout=10)
            except requests.ConnectionError:  # not listening yet
                time.sleep(0.1)
                continue
            if ready.status_code == 200:
                break
            try:
                generation = requests.post(process.url + GENERATIONS, timeout=10,
                                           json={"prompt": "too early", "num_inference_steps": 3})
            except requests.Timeout:  # accepted: the server became ready in between (it waits for partners)
                continue
            # What is kept of the answer, not the Response, which holds its connection open: a
            # few hundred of them would pass the server's --max-connections and get uvicorn's 503.
            answer = (generation.status_code, generation.headers.get("Retry-After"), generation.json())
            generation.close()
            after = requests.get(process.url + "/ready", timeout=10)
            if after.status_code == 503:  # still not ready after the request, so not ready at it either
                early.append((ready.status_code, ready.json()["status"], answer))
            time.sleep(0.01)  # a probe's pace, not a flood
        # An early request accepted at the very end must not linger into the tests (it shares nothing
        # with them: its steps are its own; its client is gone, so it is dropped at the latest at its deadline).
        wait_for(lambda: gauge(process, "fastcache_serve_queue_depth") == 0
                 and gauge(process, "fastcache_serve_running_requests") == 0, what="an idle server")
        yield process, early
    finally:
        process.stop()


def test_ready_is_503_until_every_shape_is_warmed(server):
    process, early = server
    assert early, "the server was ready before its first answer (nothing to check)"
    for ready_status, state, (status, retry_after, body) in early:
        assert ready_status == 503 and state in ("loading", "warming")
        assert status == 503 and int(retry_after) >= 1
        error = body["error"]
        assert error["type"] == "service_unavailable" and "warming up" in error["message"]
    final = requests.get(process.url + "/ready", timeout=30).json()
    assert final["warmed"] == ["128x128 batch 1", "128x128 batch 2"] and final["accelerator"] == "none"


def test_a_request_past_its_timeout_gets_504_and_never_runs(server):
    process, _ = server
    before = process.metrics()
    started = time.monotonic()
    response = requests.post(process.url + GENERATIONS, json={"prompt": "alone", "seed": 1}, timeout=120)
    assert time.monotonic() - started >= TIMEOUT_S - 0.5  # it waited for partners until its deadline
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["type"] == "timeout" and "dropped" in error["message"] and "--request-timeout" in error["message"]
    after = process.metrics()
    calls = "fastcache_serve_pipeline_calls_total"
    assert sum(metric(after, calls, batch_size=b) - metric(before, calls, batch_size=b) for b in ("1", "2")) == 0
    dropped = "fastcache_serve_dropped_requests_total"
    assert metric(after, dropped, reason="timeout") - metric(before, dropped, reason="timeout") == 1


def test_sigterm_stops_accepting_finishes_in_flight_requests_and_exits_0(server):
    process, _ = server
    # 100 steps (--max-steps) at batch 2 is about 4 s on one idle core: the checks below, a dozen
    # HTTP round trips, must all land while that call runs, on a machine shared with another worker.
    running = OpenRequest(process, {"prompt": "in flight", "n": 2, "num_inference_steps": 100, "seed": 3})
    wait_for(lambda: gauge(process, "fastcache_serve_running_requests") == 1, what="the call to start")
    queued = OpenRequest(process, {"prompt": "queued", "seed": 4})  # alone: waits behind the running call
    wait_for(lambda: gauge(process, "fastcache_serve_queue_depth") == 1, what="the second request to queue")

    process.process.send_signal(signal.SIGTERM)
    wait_for(lambda: requests.get(process.url + "/ready", timeout=10).status_code == 503, what="draining")
    assert requests.get(process.url + "/ready", timeout=10).json()["status"] == "draining"
    refused = requests.post(process.url + GENERATIONS, json={"prompt": "after SIGTERM"}, timeout=30)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert gauge(process, "fastcache_serve_running_requests") == 1  # all of the above while the call ran

    status, _, body = running.response()
    assert status == 200 and [item["seed"] for item in body["data"]] == [3, 4]
    status, _, body = queued.response()
    assert status == 200 and len(body["data"]) == 1
    assert process.process.wait(timeout=120) == 0
    assert "drained" in process.log_tail(200)
    with pytest.raises(requests.ConnectionError):
        requests.get(process.url + "/health", timeout=10)


def test_a_second_sigterm_stops_now_and_answers_503_to_every_waiting_request():
    """The first SIGTERM drains; the second drops the queue and stops the running call at its next
    step (a 900-step call: half a minute or more, were it left to finish), every waiting request answered 503."""
    process = ServerProcess(["--accelerator", "none", "--threads", "1", "--batch-sizes", "1",
                             "--default-steps", "4", "--max-steps", "1000", "--max-batch-delay-ms", "0"]).start()
    try:
        process.wait_ready()
        # DDIM's steps_offset (1) makes 1000 steps index past its 1000-entry table: refused, not a 500.
        refused = requests.post(process.url + GENERATIONS, json={"prompt": "a", "num_inference_steps": 1000},
                                timeout=30)
        assert refused.status_code == 400 and "between 1 and 999, got 1000" in refused.json()["error"]["message"]
        running = OpenRequest(process, {"prompt": "long", "num_inference_steps": 900, "seed": 1})
        wait_for(lambda: gauge(process, "fastcache_serve_running_requests") == 1, what="the long call to start")
        queued = [OpenRequest(process, {"prompt": f"queued {i}", "seed": i}) for i in range(2)]
        wait_for(lambda: gauge(process, "fastcache_serve_queue_depth") == 2, what="two queued requests")
        process.process.send_signal(signal.SIGTERM)
        wait_for(lambda: requests.get(process.url + "/ready", timeout=10).status_code == 503, what="draining")
        assert gauge(process, "fastcache_serve_queue_depth") == 2  # the first signal lets the queue run
        stopped_at = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        status, headers, body = running.response()
        assert status == 503 and "stopped this request's pipeline call" in body["error"]["message"]
        assert int(headers["retry-after"]) >= 1
        for request in queued:
            status, _, body = request.response()
            assert status == 503 and body["error"]["message"] == "the request was dropped: shutdown"
        assert process.process.wait(timeout=60) == -signal.SIGTERM  # ended by the signal, not drained
        assert time.monotonic() - stopped_at < 30
        assert "stopping now" in process.log_tail(200)
    finally:
        process.stop()


@pytest.mark.parametrize("folder, reason", [("missing", "no such folder"), ("empty", "model_index.json")])
def test_a_model_that_cannot_load_ends_the_process_with_status_1(tmp_path, folder, reason):
    if folder == "empty":
        (tmp_path / folder).mkdir()
    process = ServerProcess(["--accelerator", "none", "--model", str(tmp_path / folder)]).start()
    try:
        assert process.process.wait(timeout=600) == 1
    finally:
        process.stop()
    log = process.log_tail(200)
    assert "loading or warming the pipeline failed" in log and reason in log
