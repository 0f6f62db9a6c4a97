"""The batcher alone (no server, no pipeline): which jobs share a call, in which order, and what is
dropped. The server tests check the same rules end to end; these pin the edge cases quickly."""

from __future__ import annotations

import time

import pytest

from fastcache.serve.batcher import Batcher, Job, JobDropped, QueueClosed, QueueFull


def job(key: str, images: int = 1, *, waited: float = 10.0, deadline_in: float = 600.0) -> Job:
    """A job that arrived `waited` seconds ago (past any batch delay unless waited=0)."""
    now = time.monotonic()
    return Job(key=key, images=images, deadline=now + deadline_in, payload=key, arrival=now - waited)


def names(batch):
    return [j.payload for j in batch]


def test_compatible_jobs_join_the_oldest_and_the_rest_keep_arrival_order():
    drops = []
    batcher = Batcher(max_queue=10, max_images=4, max_delay_s=0.0, on_drop=lambda j, r: drops.append(r))
    a1, b1, a2, a3, a4 = job("a"), job("b"), job("a"), job("a", images=3), job("a")
    a1.payload, b1.payload, a2.payload, a3.payload, a4.payload = "a1", "b1", "a2", "a3", "a4"
    for item in (a1, b1, a2, a3, a4):
        batcher.submit(item)
    first = batcher.next_batch()
    assert names(first) == ["a1", "a2", "a4"]  # a3's 3 images do not fit beside 2 (max 4)
    second = batcher.next_batch()
    assert names(second) == ["b1"]
    last = batcher.next_batch()
    assert names(last) == ["a3"]
    assert batcher.depth == 0 and drops == []
    assert not batcher.idle()  # handed out, not finished: a drain must wait for them
    batcher.finished(first)
    batcher.finished(second)
    batcher.finished(last)
    assert batcher.idle()
    assert all(item.state == "running" and item.future.running() for item in (a1, b1, a2, a3, a4))


def test_without_combining_every_job_is_its_own_call():
    batcher = Batcher(max_queue=10, max_images=4, max_delay_s=60.0, combine=False)
    first, second = job("a", waited=0), job("a", waited=0)
    batcher.submit(first)
    batcher.submit(second)
    assert batcher.next_batch() == [first] and batcher.next_batch() == [second]


def test_a_fresh_leader_waits_for_partners_and_a_full_batch_does_not():
    batcher = Batcher(max_queue=10, max_images=2, max_delay_s=0.3)
    lone = job("a", waited=0)
    batcher.submit(lone)
    started = time.monotonic()
    assert batcher.next_batch() == [lone]
    assert time.monotonic() - started >= 0.25  # held for --max-batch-delay-ms
    full = [job("b", waited=0), job("b", waited=0)]
    for item in full:
        batcher.submit(item)
    started = time.monotonic()
    assert batcher.next_batch() == full
    assert time.monotonic() - started < 0.25  # full: no reason to wait


def test_jobs_past_their_deadline_are_dropped_and_never_started():
    drops = []
    batcher = Batcher(max_queue=10, max_images=4, max_delay_s=60.0, on_drop=lambda j, r: drops.append(r))
    late = job("a", waited=0, deadline_in=0.05)
    batcher.submit(late)
    assert batcher.next_batch(timeout=0.5) is None  # the leader's deadline came before its batch delay
    assert drops == ["timeout"] and late.state == "dropped"
    with pytest.raises(JobDropped) as dropped:
        late.future.result(timeout=0)
    assert dropped.value.reason == "timeout"


def test_cancel_drops_a_queued_job_and_only_marks_a_running_one():
    drops = []
    batcher = Batcher(max_queue=10, max_images=1, max_delay_s=0.0, on_drop=lambda j, r: drops.append(r))
    running, queued = job("a"), job("b")
    batcher.submit(running)
    batcher.submit(queued)
    assert batcher.next_batch() == [running]
    assert batcher.cancel(queued, "disconnected") is True and queued.state == "dropped"
    assert batcher.cancel(running, "timeout") is False and running.cancelled and running.state == "running"
    assert drops == ["disconnected"] and batcher.depth == 0


def test_cancel_of_a_job_dropped_at_its_deadline_says_it_never_ran():
    """The worker drops a job at its deadline; the HTTP side's own timeout may fire before the
    dropped future's callback reaches it, and then cancels a job that is dropped already."""
    drops = []
    batcher = Batcher(max_queue=10, max_images=4, max_delay_s=60.0, on_drop=lambda j, r: drops.append(r))
    late = job("a", waited=0, deadline_in=0.05)
    batcher.submit(late)
    assert batcher.next_batch(timeout=0.5) is None
    assert batcher.cancel(late, "timeout") is True and late.state == "dropped"
    assert drops == ["timeout"]  # counted once, by the worker


def test_a_full_queue_refuses_and_close_drops_what_waits():
    batcher = Batcher(max_queue=2, max_images=4, max_delay_s=0.0)
    waiting = [job("a"), job("b")]
    for item in waiting:
        batcher.submit(item)
    with pytest.raises(QueueFull):
        batcher.submit(job("c"))
    batcher.close(reason="shutdown")
    with pytest.raises(QueueClosed):
        batcher.submit(job("d"))
    assert all(isinstance(item.future.exception(timeout=0), JobDropped) for item in waiting)
    assert batcher.next_batch() is None


def test_flush_starts_a_waiting_batch_at_once():
    batcher = Batcher(max_queue=10, max_images=4, max_delay_s=60.0)
    lone = job("a", waited=0)
    batcher.submit(lone)
    batcher.flush()
    started = time.monotonic()
    assert batcher.next_batch() == [lone] and time.monotonic() - started < 5.0
