"""The optional native library (CMakeLists.txt), loaded lazily; fastcache never requires it.

``is_available()`` and ``load_error()`` tell the truth about it; nothing is loaded at import.
"""

from __future__ import annotations

import ctypes
import functools
import os

ABI_VERSION = 1
_DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "native",
                             "libfastcache_native.so")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    path = os.environ.get("FASTCACHE_NATIVE_LIB", _DEFAULT_PATH)
    try:
        library = ctypes.CDLL(path)
    except OSError as error:
        return None, f"native library not loaded from {path}: {error} (build it with CMakeLists.txt)"
    library.fastcache_native_abi_version.restype = ctypes.c_int32
    version = library.fastcache_native_abi_version()
    if version != ABI_VERSION:
        return None, f"native library at {path} has ABI {version}, this fastcache needs {ABI_VERSION}"
    library.fastcache_native_uniform_schedule.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_char_p]
    library.fastcache_native_uniform_schedule.restype = ctypes.c_int32
    return library, None


def is_available() -> bool:
    return _load()[0] is not None


def load_error() -> str | None:
    """Why the library is unavailable, or None when it loaded."""
    return _load()[1]


def uniform_schedule(num_steps: int, interval: int) -> list[bool]:
    """The uniform refresh schedule computed natively (raises if the library is unavailable)."""
    library, error = _load()
    if library is None:
        raise RuntimeError(error)
    buffer = ctypes.create_string_buffer(num_steps)
    if library.fastcache_native_uniform_schedule(num_steps, interval, buffer) != 0:
        raise ValueError(f"bad arguments: num_steps={num_steps}, interval={interval}")
    return [byte == 1 for byte in buffer.raw]
