"""Persist and restore torch's compile caches, so that a restarted server compiles (almost) nothing.

Inductor keeps what it compiles on disk, in ``TORCHINDUCTOR_CACHE_DIR`` (default
``/tmp/torchinductor_<user>``): the FX graph cache (generated code per graph), the AOTAutograd
cache, and the built kernels (C++ shared objects on CPU, Triton binaries on CUDA). There are two
ways to start a process with those caches filled:

* **Same machine: keep the directory.** Point ``TORCHINDUCTOR_CACHE_DIR`` at a persistent folder
  (``/tmp`` may be wiped on reboot) and nothing else is needed: a restarted process reads the
  entries its predecessor wrote, kernels included.
* **Another machine or a fresh container: ship a file.** After ``warmup``,
  ``save_compile_cache(path)`` writes torch's portable "mega-cache"
  (``torch.compiler.save_cache_artifacts()``: every FX graph, AOTAutograd and autotuning entry
  this process compiled or read; Triton kernels are bundled in by torch on CUDA) plus the C++
  kernel binaries this process loaded (CPU; the mega-cache holds only their source, and building
  them again costs as much as the cold compile on a CPU), behind a short header.
  ``load_compile_cache(path)`` in the new process, *before* ``accelerate`` + ``warmup``, checks
  the header and writes the entries and kernels into the local cache directory
  (``torch.compiler.load_cache_artifacts``), where the compiles of ``warmup`` then find them.
  Dynamo still traces the U-Net in the new process (seconds; not cached by torch 2.13 outside
  its experimental precompile mode).

Nothing here can change results: torch looks every entry up by a key that covers the graph, the
input shapes and dtypes, the torch build and the compile settings (a kernel binary by the hash of
its source and compiler command line), so an entry that does not fit is a miss and that graph
compiles as usual. The header refuses, with the reason, a file written with another torch, Python,
CUDA or Triton version, or for another GPU or CPU instruction set, whose entries could only miss.
A loaded file runs code: load only files you wrote or trust.

File layout: ``MAGIC``, one JSON line (format, environment, byte counts), torch's payload, then the
kernel files one after the other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import tempfile
from typing import Any

import torch

from .errors import CompileCacheError

logger = logging.getLogger("fastcache")

MAGIC = b"fastcache-compile-cache\n"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CompileCacheReport:
    """What `save_compile_cache` wrote or `load_compile_cache` loaded (or why it did not)."""

    path: str
    loaded: bool  # for save: True when the file was written
    reason: str  # why nothing was loaded ("" when loaded)
    artifacts: dict[str, int]  # entries per kind: "inductor", "aot_autograd", "autotune", ...
    size_bytes: int = 0
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)  # the file's header

    def __bool__(self) -> bool:
        return self.loaded


def environment() -> dict[str, Any]:
    """What an entry's cache key depends on beyond the graph, as recorded in the file's header."""
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = (
        sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        if torch.cuda.is_available() else []
    )
    return {
        "torch": torch.__version__,
        "python": platform.python_version_tuple()[0] + "." + platform.python_version_tuple()[1],
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "gpus": gpus,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


def _mismatches(saved: dict[str, Any], here: dict[str, Any]) -> list[str]:
    checked = ("torch", "python", "cuda", "triton", "cpu_capability", "machine")
    problems = [
        f"{name} {saved.get(name)!r} (here {here[name]!r})" for name in checked if saved.get(name) != here[name]
    ]
    if saved.get("gpus") and here["gpus"] and saved["gpus"] != here["gpus"]:
        problems.append(f"GPUs {saved['gpus']} (here {here['gpus']})")
    return problems


def _require_torch_api() -> None:
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        raise CompileCacheError(
            f"torch {torch.__version__} has no portable compile cache (torch.compiler.save_cache_artifacts, "
            "torch >= 2.7); keep TORCHINDUCTOR_CACHE_DIR on a persistent disk instead"
        )


def _local_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def _kernel_files() -> dict[str, str]:
    """C++ build outputs this process used, in the local cache directory: relative -> absolute path.

    Inductor builds a C++ kernel into ``<cache dir>/<key[1:3]>/<key>.*`` (key: hash of source and
    compiler command line) and skips the build where the outputs exist. The kernels' keys come from
    its in-process code caches (private API: if torch changes it, no kernel is bundled, with a
    warning). Also bundled: the CPU instruction-set probes (``<key>.cpp`` calling ``*_chk_kernel*``,
    built once per cache directory, about a second each).
    """
    try:
        from torch._inductor.codecache import CppCodeCache

        classes, keys = [CppCodeCache], set()
        while classes:
            cls = classes.pop()
            classes.extend(cls.__subclasses__())
            keys.update(key for key in vars(cls).get("cache", {}) if isinstance(key, str))
    except (ImportError, AttributeError) as error:
        logger.warning("compile cache: C++ kernels not bundled (torch's code cache changed: %s)", error)
        return {}
    root, files = _local_cache_dir(), {}
    for sub in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, sub)
        if len(sub) != 2 or not os.path.isdir(folder):
            continue
        names = sorted(os.listdir(folder))
        for name in names:
            key, _, rest = name.partition(".")
            if rest == "lock" or not (key in keys or (rest == "cpp" and _is_isa_probe(os.path.join(folder, name)))):
                continue
            for output in (n for n in names if n.startswith(key + ".") and not n.endswith(".lock")):
                files[f"{sub}/{output}"] = os.path.join(folder, output)
    return files


def _is_isa_probe(path: str) -> bool:
    try:
        if os.path.getsize(path) > 4096:
            return False
        with open(path, "rb") as file:
            return b"_chk_kernel" in file.read()
    except OSError:
        return False


def save_compile_cache(path: str | os.PathLike[str]) -> CompileCacheReport:
    """Write every compile-cache entry this process made or used to `path` (atomically).

    Call it after ``warmup`` of every shape the server will run: the file holds what was compiled
    (or read from the cache) so far in this process, fastcache's graphs and any other
    ``torch.compile`` work, plus the C++ kernels it loaded. Raises CompileCacheError when nothing
    was compiled yet.
    """
    _require_torch_api()
    path = os.fspath(path)
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise CompileCacheError(
            "nothing to save: this process has compiled nothing with inductor yet (call save_compile_cache "
            "after fastcache's warmup; with compile=False or a non-inductor backend there is nothing to cache)"
        )
    payload, info = saved
    kernels = _kernel_files()
    sizes = [[relative, os.path.getsize(absolute)] for relative, absolute in kernels.items()]  # in file order
    header = {"format": FORMAT_VERSION, "environment": environment(), "torch_bytes": len(payload), "kernels": sizes}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".fastcache-compile-cache-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(MAGIC)
            file.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            file.write(payload)
            for relative, size in sizes:
                with open(kernels[relative], "rb") as kernel:
                    content = kernel.read()
                if len(content) != size:
                    raise CompileCacheError(f"{kernels[relative]} changed while saving the compile cache")
                file.write(content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have given
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    counts = {kind: len(keys) for kind, keys in info.artifacts.items() if keys}
    counts["cpp_kernel_files"] = len(sizes)
    size = os.path.getsize(path)
    logger.info("saved compile cache %s: %d bytes, entries %s", path, size, counts)
    return CompileCacheReport(path, True, "", counts, size, header["environment"])


def _not_loaded(path: str, reason: str, environment: dict[str, Any] | None = None) -> CompileCacheReport:
    logger.warning("compile cache not loaded, graphs will compile from scratch: %s", reason)
    return CompileCacheReport(path, False, reason, {}, 0, environment or {})


def _parse(path: str, data: bytes) -> tuple[dict[str, Any], bytes, dict[str, bytes]] | str:
    """(header, torch payload, kernel files) of a file's bytes, or why they are unusable."""
    if not data.startswith(MAGIC):
        return f"{path} is not a fastcache compile cache file (no header)"
    header_line, newline, body = data[len(MAGIC):].partition(b"\n")
    try:
        header = json.loads(header_line) if newline else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        return f"{path} has an unreadable header, or a format other than {FORMAT_VERSION}"
    try:
        offset = int(header["torch_bytes"])
        sizes = [(str(name), int(size)) for name, size in header["kernels"]]
    except (KeyError, TypeError, ValueError):
        return f"{path} has an incomplete header"
    if offset < 0 or any(size < 0 for _, size in sizes):
        return f"{path} has a damaged header (negative sizes)"
    expected = offset + sum(size for _, size in sizes)
    if expected != len(body):
        return f"{path} is truncated or damaged ({len(body)} bytes after the header, {expected} expected)"
    payload, kernels = body[:offset], {}
    for name, size in sizes:
        parts = name.split("/")
        if len(parts) != 2 or any(part in ("", ".", "..") for part in parts):
            return f"{path} names a kernel file outside the cache directory: {name!r}"
        kernels[name] = body[offset:offset + size]
        offset += size
    return header, payload, kernels


def _restore_kernels(kernels: dict[str, bytes]) -> int:
    """Write kernel files missing from the local cache directory; returns how many were written."""
    root, written = _local_cache_dir(), 0
    for name, content in kernels.items():
        target = os.path.join(root, *name.split("/"))
        if os.path.exists(target):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".fastcache-", dir=os.path.dirname(target))
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        os.chmod(temporary, 0o755 if name.endswith(".so") else 0o644)
        os.replace(temporary, target)
        written += 1
    return written


def load_compile_cache(path: str | os.PathLike[str]) -> CompileCacheReport:
    """Load a file from `save_compile_cache` into the local compile caches; call it before warmup.

    Never raises for a bad file: a missing, unreadable, damaged or incompatible file returns a
    report with ``loaded=False`` and the reason (also logged at WARNING), and the graphs then
    compile from scratch as without it. The report is truthy when the entries were loaded.
    """
    path = os.fspath(path)
    if not hasattr(torch.compiler, "load_cache_artifacts"):
        return _not_loaded(path, f"torch {torch.__version__} cannot load a portable compile cache (torch >= 2.7)")
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return _not_loaded(path, f"no compile cache file at {path} (write one with save_compile_cache after warmup)")
    except OSError as error:
        return _not_loaded(path, f"cannot read {path}: {error}")
    parsed = _parse(path, data)
    if isinstance(parsed, str):
        return _not_loaded(path, parsed)
    header, payload, kernels = parsed
    saved_environment = header.get("environment") or {}
    problems = _mismatches(saved_environment, environment())
    if problems:
        return _not_loaded(
            path, f"{path} was written with another setup, its entries could not be used here: "
            + "; ".join(problems), saved_environment,
        )
    try:
        info = torch.compiler.load_cache_artifacts(payload)
    except Exception as error:  # torch found the payload unusable after the header matched
        return _not_loaded(path, f"torch could not load {path}: {type(error).__name__}: {error}", saved_environment)
    if info is None:
        return _not_loaded(path, f"torch could not read the entries of {path} (damaged)", saved_environment)
    counts = {kind: len(keys) for kind, keys in info.artifacts.items() if keys}
    counts["cpp_kernel_files"] = len(kernels)
    try:
        _restore_kernels(kernels)
    except OSError as error:  # the graphs' entries are in; kernels would be built again
        logger.warning("compile cache %s: C++ kernels not restored (%s); they will be built again", path, error)
    from torch._inductor import config as inductor_config

    if not inductor_config.fx_graph_cache:
        logger.warning("inductor's FX graph cache is off (fx_graph_cache / TORCHINDUCTOR_FX_GRAPH_CACHE): "
                       "the loaded entries will not be used")
    logger.info("loaded compile cache %s: entries %s", path, counts)
    return CompileCacheReport(path, True, "", counts, len(data), saved_environment)
