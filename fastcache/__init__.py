"""fastcache: DeepCache for diffusers U-Net pipelines as compiled graphs with a step dispatcher.

    import fastcache
    fc = fastcache.accelerate(pipe, cache_interval=3, cache_branch_id=0)
    fc.warmup(height=512, width=512, batch_size=1)
    image = pipe("a photo of an astronaut").images[0]
    fc.disable()
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .accelerate import CallStats, FastCache, WarmupReport
from .compat import DeepCacheSDHelper
from .compile_cache import CompileCacheReport, load_compile_cache, save_compile_cache
from .config import FastCacheConfig
from .runtime import MemoryReport
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

__version__ = "0.1.0"


def _schedule_argument(schedule: Any) -> Any:
    """A list of steps as a tuple (the config is frozen and hashable); anything else as given, for
    FastCacheConfig.validate to accept or refuse with InvalidConfigError."""
    if isinstance(schedule, (list, tuple, range)) or type(schedule).__name__ == "ndarray":
        return tuple(schedule)
    return schedule


def accelerate(
    pipe: Any,
    cache_interval: int = 3,
    cache_branch_id: int = 0,
    *,
    schedule: str | Sequence[int] = "uniform",
    center: int = 15,
    power: float = 1.4,
    compile: bool = True,
    compile_backend: str = "inductor",
    compile_mode: str | None = None,
    compile_options: Mapping[str, Any] | None = None,
    cuda_graphs: bool | None = None,
    emulate_graphs: bool = False,
    strict: bool = False,
    controlnet_reuse: bool = False,
    compile_vae: bool = False,
    compile_text_encoders: bool = False,
    host_timesteps: bool = False,
) -> FastCache:
    """Run `pipe`'s U-Net as DeepCache's full and shallow graphs. See FastCacheConfig for options.

    Validates everything first: on any error the pipeline is left untouched. Returns the handle
    whose ``disable()`` restores the pipeline exactly.
    """
    config = FastCacheConfig(
        cache_interval=cache_interval,
        cache_branch_id=cache_branch_id,
        schedule=_schedule_argument(schedule),
        center=center,
        power=power,
        compile=compile,
        compile_backend=compile_backend,
        compile_mode=compile_mode,
        compile_options=tuple(sorted((compile_options or {}).items())),
        cuda_graphs=cuda_graphs,
        emulate_graphs=emulate_graphs,
        strict=strict,
        controlnet_reuse=controlnet_reuse,
        compile_vae=compile_vae,
        compile_text_encoders=compile_text_encoders,
        host_timesteps=host_timesteps,
    )
    return FastCache(pipe, config)


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
