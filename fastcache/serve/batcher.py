"""Dynamic batching: a bounded queue that hands the worker one pipeline call's worth of jobs.

Its own component, as in text-generation-inference's router: it knows jobs only by a batch key
(which jobs may share a call), their image counts, arrival and deadline; neither HTTP nor the
pipeline. The rules:

* the oldest waiting job leads the next call, so jobs that cannot share run in arrival order;
* later jobs with the leader's key join it while the images fit in `max_images`;
* the call starts when it is full, or once the leader has waited `max_delay_s` since its
  arrival (a worker that was busy longer than that does not wait again);
* a job past its deadline, or cancelled, before its call starts is dropped, never run.

Thread-safe: request handlers submit and cancel from the event loop's thread, one worker thread
takes batches. Nothing here blocks the caller of `submit` or `cancel`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already."""


class QueueClosed(Exception):
    """The queue no longer accepts jobs (the server is stopping)."""


class JobDropped(Exception):
    """The job was dropped before its pipeline call started; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"dropped before it started: {reason}")
        self.reason = reason


@dataclass(eq=False)
class Job:
    """One request's work. `future` gets the worker's result, or the exception that ended it."""

    key: Hashable
    images: int
    deadline: float  # time.monotonic() after which the job is not started any more
    payload: Any
    arrival: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    state: str = "queued"  # queued -> running -> done, or queued -> dropped
    cancelled: bool = False  # nobody waits for the result any more (timeout, client gone)


def settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve `future` unless it already is (a waiter that went away may have cancelled it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Batcher:
    """The queue between request handlers and the worker thread (see the module docstring)."""

    def __init__(self, max_queue: int, max_images: int, max_delay_s: float, combine: bool = True,
                 on_drop: Callable[[Job, str], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self.max_queue = max_queue
        self.max_images = max_images
        self.max_delay_s = max_delay_s
        self.combine = combine
        self._on_drop = on_drop or (lambda job, reason: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._flush = False  # start batches without waiting for partners (draining: none will come)
        self._started = 0  # jobs handed to the worker and not yet `finished`

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def queued_images(self) -> int:
        """Images asked for by the queued jobs (a job of n images is n of a call's `max_images`)."""
        with self._cond:
            return sum(job.images for job in self._queue)

    def idle(self) -> bool:
        """Nothing queued, and every batch handed out is `finished`."""
        with self._cond:
            return not self._queue and self._started == 0

    def finished(self, batch: list[Job]) -> None:
        """The worker is done with `batch` (its futures are settled)."""
        with self._cond:
            self._started -= len(batch)

    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull or QueueClosed at once instead of waiting."""
        with self._cond:
            if self._closed:
                raise QueueClosed("the queue is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (--max-queue {self.max_queue})")
            self._queue.append(job)
            self._on_depth(len(self._queue))
            self._cond.notify_all()

    def cancel(self, job: Job, reason: str) -> bool:
        """Nobody wants `job`'s result any more. True when it never ran: it was still queued and is
        dropped now, or was dropped already (the worker drops a job at its deadline, which can come
        just before its waiter's own timeout); False when its call had started (the worker discards
        the result)."""
        with self._cond:
            job.cancelled = True
            if job.state == "queued":
                self._drop(job, reason)
                self._cond.notify_all()
            return job.state == "dropped"

    def next_batch(self, timeout: float | None = None) -> list[Job] | None:
        """Block until a batch is due and return its jobs, marked running (leader first).

        Returns None when the queue is closed and empty, or when `timeout` seconds passed with
        nothing queued.
        """
        give_up = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                for job in [job for job in self._queue if now >= job.deadline or job.future.cancelled()]:
                    self._drop(job, "timeout" if now >= job.deadline else "cancelled")
                if not self._queue:
                    if self._closed or (give_up is not None and now >= give_up):
                        return None
                    self._cond.wait(None if give_up is None else give_up - now)
                    continue
                leader = self._queue[0]
                batch = self._gather(leader)
                due = leader.arrival + self.max_delay_s
                if not self.combine or self._closed or self._flush or now >= due or sum(job.images for job in batch) >= self.max_images:
                    return self._start(batch)
                self._cond.wait(min(due, min(job.deadline for job in self._queue)) - now)

    def flush(self) -> None:
        """From now on start every batch at once, with what is queued (no wait for partners)."""
        with self._cond:
            self._flush = True
            self._cond.notify_all()

    def close(self, reason: str | None = None) -> None:
        """Accept nothing more; with `reason`, drop every queued job too (else the worker drains them)."""
        with self._cond:
            self._closed = True
            if reason is not None:
                for job in list(self._queue):
                    self._drop(job, reason)
            self._cond.notify_all()

    # -- internals (called with the lock held) --------------------------------------------------
    def _gather(self, leader: Job) -> list[Job]:
        batch, images = [leader], leader.images
        if self.combine:
            for job in list(self._queue)[1:]:
                if job.key == leader.key and images + job.images <= self.max_images:
                    batch.append(job)
                    images += job.images
        return batch

    def _start(self, batch: list[Job]) -> list[Job]:
        started = []
        for job in batch:
            self._queue.remove(job)
            if job.future.set_running_or_notify_cancel():
                job.state = "running"
                started.append(job)
                self._started += 1
            else:  # its waiter cancelled the future between the scan and now
                job.state, job.cancelled = "dropped", True
                self._on_drop(job, "cancelled")
        self._on_depth(len(self._queue))
        return started  # empty when every job was cancelled at the last moment: the worker skips it

    def _drop(self, job: Job, reason: str) -> None:
        self._queue.remove(job)
        job.state = "dropped"
        self._on_drop(job, reason)
        self._on_depth(len(self._queue))
        settle(job.future, error=JobDropped(reason))
