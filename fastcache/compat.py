"""`DeepCacheSDHelper`: the DeepCache 0.1.1 helper's interface, run by fastcache.

DeepCache users change only the import::

    from fastcache import DeepCacheSDHelper        # was: from DeepCache import DeepCacheSDHelper
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    ...
    helper.disable()

Differences, all deliberate: every pipeline call starts with a refresh (DeepCache keeps its step
origin and cached features from the previous call), steps of second-order schedulers are counted
correctly, and ``skip_mode`` other than ``"uniform"`` selects DeepCache's quadratic schedule
(DeepCache's helper never refreshes in that mode). Extra keyword arguments of `set_params` are
passed to `fastcache.accelerate` (``compile=False``, ``cuda_graphs=...``, ``strict=...``).
"""

from __future__ import annotations

from typing import Any

from .accelerate import FastCache, accelerate
from .config import FastCacheConfig
from .errors import AlreadyAcceleratedError, InvalidConfigError

_SKIP_MODES = {"uniform": "uniform", "quadratic": "quadratic", "non-uniform": "quadratic", "nonuniform": "quadratic"}


class DeepCacheSDHelper:
    """Drop-in replacement for ``DeepCache.DeepCacheSDHelper`` (set_params / enable / disable)."""

    def __init__(self, pipe: Any = None) -> None:
        self.pipe = pipe
        self.handle: FastCache | None = None
        self.set_params()

    def set_params(
        self, cache_interval: int = 1, cache_branch_id: int = 0, skip_mode: str = "uniform", **options: Any
    ) -> None:
        """Same defaults as DeepCache (interval 1: caching off until set). Applies at enable()."""
        if skip_mode not in _SKIP_MODES:
            raise InvalidConfigError(f"skip_mode must be one of {sorted(_SKIP_MODES)}, got {skip_mode!r}")
        self.params = dict(
            cache_interval=cache_interval, cache_branch_id=cache_branch_id, schedule=_SKIP_MODES[skip_mode], **options
        )
        FastCacheConfig.from_options(**self.params).validate()

    def enable(self, pipe: Any = None) -> None:
        if pipe is not None:
            self.pipe = pipe
        if self.pipe is None:
            raise InvalidConfigError("DeepCacheSDHelper needs a pipeline: DeepCacheSDHelper(pipe=...) or enable(pipe)")
        if self.handle is not None and self.handle.enabled:
            raise AlreadyAcceleratedError("this DeepCacheSDHelper is already enabled; call disable() first")
        self.handle = accelerate(self.pipe, **self.params)

    def disable(self) -> None:
        if self.handle is not None:
            self.handle.disable()
            self.handle = None
