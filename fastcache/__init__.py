"""fastcache: DeepCache for diffusers U-Net pipelines as compiled graphs with a step dispatcher.

    import fastcache
    fc = fastcache.accelerate(pipe, cache_interval=3, cache_branch_id=0)
    fc.warmup(height=512, width=512, batch_size=1)
    image = pipe("a photo of an astronaut").images[0]
    fc.disable()
"""

from __future__ import annotations

from .accelerate import CallStats, FastCache, WarmupReport, accelerate
from .compat import DeepCacheSDHelper
from .compile_cache import CompileCacheReport, load_compile_cache, save_compile_cache
from .config import FastCacheConfig
from .errors import (
    AlreadyAcceleratedError,
    CompileCacheError,
    CompileError,
    FastCacheError,
    HandleDisabledError,
    InvalidConfigError,
    InvalidInputError,
    ReentrantCallError,
    ShapeLimitError,
    ShapeNotWarmedError,
    UnsupportedInputError,
    UnsupportedPipelineError,
)
from .runtime import MemoryReport

__version__ = "0.1.0"

__all__ = [
    "accelerate",
    "FastCache",
    "FastCacheConfig",
    "DeepCacheSDHelper",
    "CallStats",
    "WarmupReport",
    "MemoryReport",
    "FastCacheError",
    "UnsupportedPipelineError",
    "InvalidConfigError",
    "AlreadyAcceleratedError",
    "UnsupportedInputError",
    "InvalidInputError",
    "ReentrantCallError",
    "ShapeNotWarmedError",
    "CompileError",
    "ShapeLimitError",
    "HandleDisabledError",
    "CompileCacheError",
    "save_compile_cache",
    "load_compile_cache",
    "CompileCacheReport",
]
