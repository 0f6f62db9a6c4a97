"""One pipeline call at a time per handle, re-entrant for the thread that holds it."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class CallLock:
    """A handle's graphs, static buffers, kept features and step counter are shared by every call,
    so overlapping calls (a threaded web server's workers) would silently mix their steps: one
    pipeline call, warm-up or disable() runs at a time and other threads wait their turn.

    The thread that holds it passes (warm-up's own pipeline call, disable() from fastcache's error
    handling inside a call), which a plain ``threading.RLock`` would allow too; `held_here` is what
    the U-Net's forward asks to tell a call inside this thread's pipeline call from one outside it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def held_here(self) -> bool:
        return self._owner == threading.get_ident()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.held_here():
            yield
            return
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None
