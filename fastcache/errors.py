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


class InvalidInputError(FastCacheError, ValueError):
    """A U-Net call's inputs are wrong for this U-Net (a channel count, an embedding width, a dtype
    that plain diffusers would also fail on): the caller's error. Nothing changed; the handle
    stays enabled and keeps every prepared shape."""


class ReentrantCallError(FastCacheError, RuntimeError):
    """The accelerated pipeline was called from inside one of its own calls (a callback)."""


class ShapeNotWarmedError(FastCacheError, RuntimeError):
    """Strict serving met an input shape that `warmup` did not prepare."""


class CompileError(FastCacheError, RuntimeError):
    """Compiling or capturing a graph failed for a valid input.

    When the handle had not served any shape yet, the pipeline was restored before this was
    raised (nothing works: a broken backend or setting). Otherwise only that shape is refused: the
    handle stays enabled and keeps the shapes it prepared (see the message).
    """


class ShapeLimitError(CompileError):
    """`warmup` asked for a new shape beyond the graphs one handle holds (`runtime.RECOMPILE_LIMIT`
    per U-Net function). Nothing changed; the prepared shapes keep their graphs."""


class HandleDisabledError(FastCacheError, RuntimeError):
    """A method that needs an enabled handle was called after `disable()`."""


class CompileCacheError(FastCacheError, RuntimeError):
    """A compile cache file could not be written (loading never raises: it reports and compiles)."""
