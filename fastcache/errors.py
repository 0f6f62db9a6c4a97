"""The errors fastcache raises. Each subclasses a builtin so callers may catch either."""

from __future__ import annotations


class FastCacheError(Exception):
    """Base class of every error fastcache raises on purpose."""


class UnsupportedPipelineError(FastCacheError, TypeError):
    """The pipeline or its U-Net is not one fastcache can split (nothing was changed)."""


class InvalidConfigError(FastCacheError, ValueError):
    """An argument is out of its allowed range (nothing was changed)."""


class AlreadyAcceleratedError(FastCacheError, RuntimeError):
    """The pipeline's U-Net is already accelerated or patched by another tool."""


class UnsupportedInputError(FastCacheError, NotImplementedError):
    """A U-Net call passed inputs the split does not handle yet (the pipeline stays accelerated)."""


class ReentrantCallError(FastCacheError, RuntimeError):
    """The accelerated pipeline was called from inside one of its own calls (a callback)."""


class ShapeNotWarmedError(FastCacheError, RuntimeError):
    """Strict serving met an input shape that `warmup` did not prepare."""


class CompileError(FastCacheError, RuntimeError):
    """Compiling or capturing a graph failed; the pipeline was restored before this was raised."""


class CompileCacheError(FastCacheError, RuntimeError):
    """A compile cache file could not be written (loading never raises: it reports and compiles)."""
