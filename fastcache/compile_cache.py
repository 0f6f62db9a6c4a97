"""Persist and restore torch's compile caches, so that a restarted server compiles (almost) nothing.

Inductor keeps what it compiles on disk, in ``TORCHINDUCTOR_CACHE_DIR``: the FX graph cache
(generated code per graph), the AOTAutograd cache, and the built kernels (C++ shared objects on
CPU, Triton binaries on CUDA). There are two ways to start a process with those caches filled:

* **Same machine: keep the directory.** Point ``TORCHINDUCTOR_CACHE_DIR`` at a persistent folder
  of your own and nothing else is needed: a restarted process reads the entries its predecessor
  wrote, kernels included.
* **Another machine or a fresh container: ship a file.** After ``warmup``,
  ``save_compile_cache(path)`` writes torch's portable "mega-cache"
  (``torch.compiler.save_cache_artifacts()``: every FX graph, AOTAutograd and autotuning entry
  this process compiled or read; Triton kernels are bundled in by torch on CUDA) plus the C++
  kernel binaries this process loaded (CPU; the mega-cache holds only their source, and building
  them again costs as much as the cold compile on a CPU), behind a short header.
  ``load_compile_cache(path)`` in the new process, *before* ``accelerate`` + ``warmup``, checks
  the file and writes the entries and kernels into the local cache directory
  (``torch.compiler.load_cache_artifacts``), where the compiles of ``warmup`` then find them.
  Dynamo still traces the U-Net in the new process (seconds; not cached by torch 2.13 outside
  its experimental precompile mode).

Nothing here can change results: torch looks every entry up by a key that covers the graph, the
input shapes and dtypes, the torch build and the compile settings (a kernel binary by the hash of
its source and compiler command line), so an entry that does not fit is a miss and that graph
compiles as usual. The header refuses, with the reason, a file written with another torch, Python,
CUDA or Triton version, or for another GPU or CPU instruction set, whose entries could only miss.

**A compile cache is code.** Its entries are pickles, generated Python modules and shared
libraries that this process unpickles, imports and loads when a graph hits them. So:

* ``load_compile_cache`` refuses a file, or a local cache directory, that is not owned by this
  user (or root) or that group or others may write, unless the caller passes ``trusted=True``.
* Before anything is written or unpickled, every entry is checked: only the entry kinds torch's
  compile caches use, names that stay inside the cache layout (no absolute path, no ``..``, no
  sub-folder, no NUL, bounded length), and pickles that only build torch's (and triton's)
  compile-cache classes, containers and dtypes, scanned against stand-ins without running
  anything (no function call beyond those, no ``os``, ``subprocess``, ``eval``..., no change to
  torch's own objects). One bad entry refuses the whole file, and nothing is written.
  ``trusted=True`` never skips these.
  These checks stop a crafted file from acting while it is loaded; what a trusted file's entries
  do when a graph hits them is still the file author's code, which is why ownership matters.
* torch's own default cache directory, ``/tmp/torchinductor_<user>``, is a predictable name in a
  world-writable folder: when ``TORCHINDUCTOR_CACHE_DIR`` is unset (or that default),
  ``load_compile_cache`` points it at ``$XDG_CACHE_HOME/fastcache/torchinductor``
  (``~/.cache/...``), created with mode 0700, for this process.

File layout: ``MAGIC``, one JSON line (format, environment, byte counts), torch's payload, then the
kernel files one after the other.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import dataclasses
import enum
import importlib
import inspect
import io
import json
import logging
import os
import pickle
import platform
import re
import secrets
import stat
import sys
import types
import zlib
from collections.abc import Callable
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


# --- Where the local cache lives --------------------------------------------------------------


def private_cache_dir() -> str:
    """fastcache's default inductor cache directory: per user, not a guessable name in /tmp.

    ``$XDG_CACHE_HOME/fastcache/torchinductor`` (``~/.cache/fastcache/torchinductor`` when
    XDG_CACHE_HOME is unset or not absolute, as the XDG spec says).
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastcache", "torchinductor")


def _make_private_dirs(path: str) -> None:
    """Create `path` and any missing parent with mode 0700 (os.makedirs' mode skips the parents)."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)


def _torch_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


def use_private_cache_dir() -> str:
    """Point inductor's cache at `private_cache_dir()` unless the user chose a directory; return it.

    torch's default, ``/tmp/torchinductor_<user>``, can be created first by another user of the
    machine, who then owns the code this process loads from it. An explicit
    ``TORCHINDUCTOR_CACHE_DIR`` (other than that default, which torch also writes into the
    variable once it has used it) is left alone. Call it before anything compiles: a process
    switched midway keeps what it compiled before in the old directory.
    """
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and os.path.abspath(current) != _torch_default_cache_dir():
        return os.path.abspath(current)
    target = private_cache_dir()
    try:
        if not os.path.isabs(target):  # no home directory to expand "~" to
            raise OSError(f"{target} is not an absolute path")
        _make_private_dirs(target)
    except OSError as error:
        logger.warning("compile cache: cannot create the per-user cache directory %s (%s); inductor keeps %s",
                       target, error, current or "its default")
        return os.path.abspath(current) if current else _local_cache_dir()
    if current != target:
        logger.info("compile cache: inductor's cache directory is now %s (TORCHINDUCTOR_CACHE_DIR)", target)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = target
    return target


def _local_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


# --- Who may have written it -------------------------------------------------------------------


def _trust_problem(status: os.stat_result, what: str, path: str, own_it: str) -> str | None:
    """Why `path` (a file or a directory, by its stat) is not safe to load code from, or None.

    Safe: owned by this user or root (root can change this process anyway) and not writable by
    group or others, who could otherwise put their code in it.
    """
    uid = os.getuid()
    if status.st_uid not in (uid, 0):
        return (f"{what} {path} is owned by uid {status.st_uid}, not by this user (uid {uid}) or root; a compile "
                f"cache is code this process runs, so fastcache loads only what you control: {own_it}, or pass "
                "trusted=True if you know who wrote it")
    if status.st_mode & 0o022:
        return (f"{what} {path} is writable by group or others (mode {stat.S_IMODE(status.st_mode):04o}); a "
                f"compile cache is code this process runs: run `chmod go-w {path}`, or pass trusted=True if you "
                "know who can write it")
    return None


# --- Names that stay inside the cache layout ----------------------------------------------------

_MAX_NAME = 200
# One path component: letters, digits, "_", "-", "=", "."; never "." / ".." / hidden (no leading dot).
_PLAIN = re.compile(r"(?!\.)[A-Za-z0-9_.=\-]{1,%d}" % _MAX_NAME)
_KERNEL_NAME = re.compile(r"[A-Za-z0-9_]{2}/" + _PLAIN.pattern)  # <cache>/<key[1:3]>/<key>.<ext>
_ARTIFACT_KEYS: dict[str, re.Pattern[str]] = {
    "inductor": re.compile(r"[A-Za-z0-9_]{3,%d}" % _MAX_NAME),  # -> fxgraph/<key[1:3]>/<key>/
    "aot_autograd": re.compile(r"[A-Za-z0-9_]{1,%d}" % _MAX_NAME),  # -> aotautograd/<key>/
    "autotune": re.compile(r"(?!\.)[A-Za-z0-9_.=\-]{1,64}/(?!\.)[A-Za-z0-9_.=\-]{1,%d}\.best_config" % _MAX_NAME),
    "pgo": re.compile(r"(?!\.)[A-Za-z0-9_.:=\-]{1,%d}" % _MAX_NAME),  # -> dynamo/code_state_<key>.pkl
}
_PICKLED_KINDS = ("inductor", "aot_autograd", "pgo")


def _is_plain(value: Any) -> bool:
    return isinstance(value, str) and _PLAIN.fullmatch(value) is not None


def _is_device(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1024


# --- torch's payload ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Artifact:
    kind: str
    key: str
    content: bytes = dataclasses.field(repr=False)


class _Reader:
    """torch.utils._appending_byte_serializer's format (version 1), read with bounds checks.

    torch's own reader slices past the end silently and decodes base64 leniently; this one
    refuses anything it would read differently, so what is checked is exactly what torch loads.
    """

    def __init__(self, data: bytes) -> None:
        if len(data) < 12:
            raise ValueError("too short")
        if zlib.crc32(data[4:]).to_bytes(4, "big") != data[:4]:
            raise ValueError("checksum mismatch")
        self.data, self.offset = data, 4

    def finished(self) -> bool:
        return self.offset == len(self.data)

    def read_uint64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def read_bytes(self) -> bytes:
        return self.take(self.read_uint64())

    def read_str(self) -> str:
        return base64.b64decode(self.read_bytes(), validate=True).decode("utf-8")

    def take(self, size: int) -> bytes:
        if size > len(self.data) - self.offset:
            raise ValueError("truncated")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk


def _read_artifacts(payload: bytes) -> list[_Artifact]:
    """Every (kind, key, content) in torch's payload; ValueError when it is not that format."""
    try:
        reader = _Reader(payload)
        if (version := reader.read_uint64()) != 1:
            raise ValueError(f"encoding version {version}, not 1")
        artifacts = []
        while not reader.finished():
            kind, count = reader.read_str(), reader.read_uint64()
            if count > len(payload) // 16:  # each entry takes at least 16 bytes
                raise ValueError(f"{count} entries announced")
            artifacts.extend(_Artifact(kind, reader.read_str(), reader.read_bytes()) for _ in range(count))
        return artifacts
    except (binascii.Error, UnicodeDecodeError) as error:
        raise ValueError(f"bad name encoding ({error})") from error


def _artifact_problem(artifact: _Artifact) -> str | None:
    """Why one entry must not reach torch, or None; `artifact.kind` says where torch writes it."""
    rule = _ARTIFACT_KEYS.get(artifact.kind)
    if rule is None:
        return (f"has an entry of kind {artifact.kind[:50]!r}; fastcache loads only "
                f"{', '.join(sorted(_ARTIFACT_KEYS))} entries")
    if rule.fullmatch(artifact.key) is None:
        return (f"has a {artifact.kind} entry named {artifact.key[:300]!r}, which is not a plain name inside the "
                f"cache directory (allowed: {rule.pattern!r}; no absolute path, '..', NUL or extra sub-folder)")
    if artifact.kind == "autotune":
        try:
            ok = isinstance(json.loads(artifact.content), dict)
        except (ValueError, RecursionError):
            ok = False
        return None if ok else f"has an autotune entry {artifact.key!r} that is not a JSON object"
    if artifact.kind in _PICKLED_KINDS:
        problem = _pickle_problem(artifact.content)
        return None if problem is None else f"has a {artifact.kind} entry {artifact.key!r} that {problem}"
    return None


# --- Pickled entries, read without running them ----------------------------------------------
#
# An entry's pickle may only name classes defined in torch's compile caches (and triton's, on
# CUDA), a few containers and dtypes. Names are resolved (importing only those packages) to see
# what they are; the pickle itself is then run against stand-ins, so nothing it names is called.
# What it would call: only containers, enums and torch._dynamo.source's dataclasses (the pickles
# build everything else with __new__ + __dict__), inspect's signatures (a triton kernel's), and
# getattr for a bound method of an object it built (a triton kernel's device_caches factory);
# never a function. sympy objects (dynamic-shape guards; fastcache compiles with dynamic=False)
# are refused: their constructors parse strings.

_PICKLE_PACKAGES = ("torch._inductor", "torch._dynamo", "torch._functorch", "torch._subclasses", "torch._guards",
                    "torch.utils._ordered_set", "triton")
_CALLABLE_GLOBALS = frozenset(
    {("builtins", name) for name in ("set", "frozenset", "list", "dict", "tuple", "bytearray", "slice", "range",
                                     "complex", "int", "float", "str", "bytes", "bool")}
    | {("collections", name) for name in ("OrderedDict", "defaultdict", "Counter", "deque")}
    | {("torch", "device"), ("torch", "Size"), ("torch.utils._ordered_set", "OrderedSet")}
    | {("inspect", "Signature"), ("inspect", "Parameter"), ("inspect", "_ParameterKind")}
)
_VALUE_GLOBALS = frozenset(
    {("torch._utils", f"torch.{name}")
     for name in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")}
    | {("inspect", "_empty")}
)
_GETATTR = ("builtins", "getattr")  # only as a bound method: see _bound_method_problem
_PUBLIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}")
_CALLABLE_DATACLASS_MODULES = ("torch._dynamo.source",)  # dataclass_with_cached_hash: pickled as cls(*fields)
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

# Fields torch turns into paths when it writes an entry's Triton kernels (TritonBundler.read_and_emit,
# reload_cubin_path): these must be plain names. Exact classes: required; whole modules: when present.
_PATH_FIELDS: dict[tuple[str, str], dict[str, Callable[[Any], bool]]] = {
    ("torch._inductor.triton_bundler", "TritonKernelArtifacts"): {"kernel_hash": _is_plain, "device": _is_device},
    ("torch._inductor.triton_bundler", "TritonKernelArtifact"): {"filename": _is_plain},
}
_PATH_FIELDS_IF_PRESENT: dict[str, dict[str, Callable[[Any], bool]]] = {
    "torch._inductor.runtime.static_triton_launcher": {"name": _is_plain, "hash": _is_plain},
    "torch._inductor.runtime.triton_heuristics": {
        "compile_meta": lambda meta: isinstance(meta, dict) and _is_device(meta.get("device", 0))},
}


class _Refused(Exception):
    """A scanned pickle did something no compile-cache entry does (the message says what)."""


class _StandIn:
    """What a scanned pickle builds instead of any object it names: records, runs nothing.

    A pickle may fill (BUILD, APPENDS, SETITEMS) only what it built with __new__ or a container it
    made: filling a class it names, or what another call returned (an enum member), would change
    objects the whole process shares when torch unpickles it for real.
    """

    _global: tuple[str, str]
    _scan: _PickleScan

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:  # NEWOBJ: cls.__new__(cls, *args)
        return cls._scan.record(cls, "new" if not (args or kwargs) else "new_with_args")

    def __setstate__(self, state: Any) -> None:  # BUILD
        self._filled("sets the state of")
        self._scan.states[id(self)] = state

    def append(self, *items: Any) -> None:  # APPENDS / ADDITEMS use append, extend or add
        self._filled("adds items to")

    extend = add = append

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS
        self._filled("sets items of")

    def _filled(self, action: str) -> None:
        if self._scan.made[id(self)] == "call" and self._global not in _CALLABLE_GLOBALS:
            raise _Refused(f"{action} what {'.'.join(self._global)}(...) returned, an object torch would share")


def _refuse_on_class(action: str) -> property:
    """On the stand-in classes (found before any instance attribute), an action that always fails."""

    def refuse(cls: type, *args: Any) -> None:
        raise _Refused(f"{action} the class {'.'.join(cls._global)} itself, which would change it in torch")

    return property(lambda cls: lambda *args: refuse(cls, *args))


class _StandInType(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> _StandIn:  # REDUCE / INST / OBJ: the pickle calls it
        if cls._global == _GETATTR:
            cls._scan.getattrs.append((args, kwargs))
        return cls._scan.record(cls, "call")

    __setstate__ = _refuse_on_class("sets the state of")  # BUILD on a class: would patch torch's classes
    append = extend = add = _refuse_on_class("adds items to")


class _PickleScan(pickle.Unpickler):
    """Runs a pickle against stand-ins: which globals it names, how it uses them, what state it sets.

    The names checked are the names torch's unpickler resolves: the Python 2 renames it applies
    (_compat_pickle) start from names that are all refused here.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.uses: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        self.instances: list[_StandIn] = []
        self.made: dict[int, str] = {}
        self.states: dict[int, Any] = {}
        self.getattrs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._types: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> type:
        self.uses[(module, name)].add("ref")
        if (module, name) not in self._types:
            self._types[(module, name)] = _StandInType(
                "StandIn", (_StandIn,), {"_global": (module, name), "_scan": self})
        return self._types[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("uses a persistent id, which compile-cache entries never do")

    def record(self, cls: type, use: str) -> _StandIn:
        self.uses[cls._global].add(use)
        instance = object.__new__(cls)
        self.instances.append(instance)
        self.made[id(instance)] = use
        return instance


def _pickle_problem(content: bytes) -> str | None:
    """Why a pickled entry must not be loaded (it names or calls something no entry needs), or None."""
    scan = _PickleScan(content)
    try:
        scan.load()
    except _Refused as error:
        return str(error)
    except Exception as error:  # any malformed pickle; nothing real was called
        return f"is not a readable pickle ({type(error).__name__}: {str(error)[:200]})"
    for (module, name), uses in scan.uses.items():
        if (problem := _global_problem(module, name, uses)) is not None:
            return problem
    return _bound_method_problem(scan) or _path_field_problem(scan)


def _global_problem(module: str, name: str, uses: set[str]) -> str | None:
    shown = f"{module[:100]}.{name[:100]}"
    if (module, name) in _CALLABLE_GLOBALS or ((module, name) in _VALUE_GLOBALS and uses == {"ref"}):
        return None
    if (module, name) == _GETATTR and uses <= {"ref", "call"}:
        return None
    if module == "torch" and uses == {"ref"} and isinstance(getattr(torch, name, None), torch.dtype):
        return None
    if not (_in_packages(module) and _DOTTED.fullmatch(name)):
        return f"names {shown}, which is not one of torch's compile-cache classes (refused without running it)"
    target = _resolve(module, name)
    defined_in = getattr(target, "__module__", None)
    if target is None or not isinstance(defined_in, str) or not _in_packages(defined_in):
        return f"names {shown}, which is not a class or function defined in torch's compile caches"
    if isinstance(target, type):
        return _class_problem(shown, target, uses)
    if isinstance(target, (types.FunctionType, types.BuiltinFunctionType)):
        return None if uses == {"ref"} else f"calls the function {shown}, which no compile-cache entry does"
    return f"names {shown}, which is neither a class nor a function"


def _class_problem(shown: str, cls: type, uses: set[str]) -> str | None:
    if "call" in uses and not _may_call(cls):
        return f"calls {shown}(...), which a compile-cache entry never does (only containers, enums, dynamo sources)"
    if "new_with_args" in uses and not _is_namedtuple(cls):
        return f"builds {shown} with arguments to __new__, which a compile-cache entry never does"
    if uses & {"new", "new_with_args"} and not _plain_new(cls):
        return f"builds {shown}, whose __new__ is its own code"
    return None


def _in_packages(module: str) -> bool:
    inside = any(module == package or module.startswith(package + ".") for package in _PICKLE_PACKAGES)
    return inside and not module.endswith(".__main__")  # importing a __main__ would run a program


def _resolve(module: str, name: str) -> Any:
    """The object `module.name` names (importing only a module of _PICKLE_PACKAGES), or None."""
    try:
        target: Any = sys.modules.get(module) or importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
    except Exception:  # missing module or attribute: the entry cannot be for this torch anyway
        return None
    return target


def _may_call(cls: type) -> bool:
    """Calling `cls` runs only code meant for restoring values: an enum lookup or a generated __init__."""
    if issubclass(cls, enum.Enum):
        return True
    if cls.__module__ not in _CALLABLE_DATACLASS_MODULES:
        return False
    owner = next(klass for klass in cls.__mro__ if "__init__" in vars(klass))
    params = vars(owner).get("__dataclass_params__")
    return params is not None and params.init


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and hasattr(cls, "_fields")


def _plain_new(cls: type) -> bool:
    owner = next(klass for klass in cls.__mro__ if "__new__" in vars(klass))
    return owner.__module__ == "builtins" or _is_namedtuple(cls)


def _bound_method_problem(scan: _PickleScan) -> str | None:
    """getattr may only take a plain method of an object the pickle built, making a bound method.

    A property, a class attribute or a dunder would run code, or reach objects (function globals,
    modules) outside the allowed names.
    """
    for args, kwargs in scan.getattrs:
        target, name = (args + (None, None))[:2]
        if kwargs or len(args) != 2 or not isinstance(name, str) or _PUBLIC_NAME.fullmatch(name) is None:
            return f"calls getattr for {str(name)[:100]!r}, which is not a public method name"
        if not isinstance(target, _StandIn) or scan.made[id(target)] not in ("new", "new_with_args"):
            return f"takes {name!r} of an object it did not build, which a compile-cache entry never does"
        cls = _resolve(*target._global)
        if not isinstance(cls, type) or not isinstance(inspect.getattr_static(cls, name, None), types.FunctionType):
            return f"takes {name!r} of a {'.'.join(target._global)}, which is not one of its methods"
    return None


def _path_field_problem(scan: _PickleScan) -> str | None:
    for instance in scan.instances:
        module, name = instance._global
        required = _PATH_FIELDS.get((module, name))
        fields = required or _PATH_FIELDS_IF_PRESENT.get(module, {})
        if not fields:
            continue
        state = scan.states.get(id(instance))
        if not isinstance(state, dict):
            if required:
                return f"builds a {name} without its fields"
            continue
        for field, valid in fields.items():
            if (field in state or required) and not valid(state.get(field)):
                return (f"has a {name} whose {field} {str(state.get(field))[:200]!r} is not a plain name (or device "
                        "number) inside the cache directory")
    return None


# --- The file ------------------------------------------------------------------------------------


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


def _fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (best effort: some filesystems cannot open a folder)."""
    try:
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def save_compile_cache(path: str | os.PathLike[str]) -> CompileCacheReport:
    """Write every compile-cache entry this process made or used to `path` (atomically, durably).

    Call it after ``warmup`` of every shape the server will run: the file holds what was compiled
    (or read from the cache) so far in this process, fastcache's graphs and any other
    ``torch.compile`` work, plus the C++ kernels it loaded. The file is written with mode 0644 at
    most (never group/other-writable, which `load_compile_cache` would refuse) and fsynced before
    it replaces `path`, so a crash leaves the old file or the new one, never a torn one. Raises
    CompileCacheError when nothing was compiled yet.
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
    handle, temporary = _new_file(folder, ".fastcache-compile-cache-")
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
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(folder)
    counts = {kind: len(keys) for kind, keys in info.artifacts.items() if keys}
    counts["cpp_kernel_files"] = len(sizes)
    size = os.path.getsize(path)
    logger.info("saved compile cache %s: %d bytes, entries %s", path, size, counts)
    return CompileCacheReport(path, True, "", counts, size, header["environment"])


def _new_file(folder: str, prefix: str) -> tuple[int, str]:
    """A new file in `folder` (random name, O_EXCL), open for writing, mode 0644 less the umask.

    Unlike mkstemp's 0600 + chmod, the mode is set at creation and never has group/other write
    or execute bits, whatever the umask (which may only remove more).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        path = os.path.join(folder, prefix + secrets.token_hex(8))
        try:
            return os.open(path, flags, 0o644), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {folder}")


def _not_loaded(path: str, reason: str, environment: dict[str, Any] | None = None) -> CompileCacheReport:
    logger.warning("compile cache not loaded, graphs will compile from scratch: %s", reason)
    return CompileCacheReport(path, False, reason, {}, 0, environment or {})


def _read(path: str, trusted: bool) -> bytes | str:
    """The file's bytes, or why it was not read: missing, not a regular file, or not yours.

    The ownership check is made on the opened file (fstat), so what is read is what was checked.
    """
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return f"no compile cache file at {path} (write one with save_compile_cache after warmup)"
    except (OSError, ValueError) as error:
        return f"cannot read {path}: {error}"
    with os.fdopen(handle, "rb") as file:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):
            return f"{path} is not a regular file"
        if not trusted and (problem := _trust_problem(status, "the compile cache file", path,
                                                      "copy it to a file of your own")):
            return problem
        try:
            return file.read()
        except OSError as error:
            return f"cannot read {path}: {error}"


@dataclasses.dataclass(frozen=True)
class _Parsed:
    header: dict[str, Any]
    environment: dict[str, Any]
    payload: bytes
    kernels: dict[str, bytes]


def _parse(path: str, data: bytes) -> _Parsed | str:
    """Header, torch payload and kernel files of a file's bytes, or why they are unusable."""
    if not data.startswith(MAGIC):
        return f"{path} is not a fastcache compile cache file (no header)"
    header_line, newline, body = data[len(MAGIC):].partition(b"\n")
    try:
        header = json.loads(header_line) if newline else None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or type(header.get("format")) is not int or header["format"] != FORMAT_VERSION:
        return f"{path} has an unreadable header, or a format other than {FORMAT_VERSION}"
    saved_environment, offset, kernel_list = header.get("environment"), header.get("torch_bytes"), header.get("kernels")
    if not isinstance(saved_environment, dict):
        return f"{path} has an incomplete header (its environment is not a JSON object)"
    if type(offset) is not int or not isinstance(kernel_list, list) or not all(
            isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and type(item[1]) is int
            for item in kernel_list):
        return f"{path} has an incomplete header (torch_bytes must be a number, kernels a list of [name, size])"
    if offset < 0 or any(size < 0 for _, size in kernel_list):
        return f"{path} has a damaged header (negative sizes)"
    expected = offset + sum(size for _, size in kernel_list)
    if expected != len(body):
        return f"{path} is truncated or damaged ({len(body)} bytes after the header, {expected} expected)"
    payload, kernels = body[:offset], {}
    for name, size in kernel_list:
        if _KERNEL_NAME.fullmatch(name) is None or name in kernels:
            return (f"{path} names a kernel file outside the cache directory's layout, or twice: {name[:300]!r} "
                    f"(allowed: '<two letters or digits>/<file name>', the file name of letters, digits and "
                    f"'_.=-', not starting with '.', at most {_MAX_NAME} characters)")
        kernels[name] = body[offset:offset + size]
        offset += size
    return _Parsed(header, saved_environment, payload, kernels)


def _entries_problem(path: str, payload: bytes) -> str | None:
    """Why torch must not see this payload (one bad entry refuses them all), or None."""
    try:
        artifacts = _read_artifacts(payload)
    except ValueError as error:
        return f"torch could not read the entries of {path} (damaged: {error})"
    for artifact in artifacts:
        if (problem := _artifact_problem(artifact)) is not None:
            return f"{path} {problem}; nothing was loaded"
    return None


def _check(path: str, data: bytes) -> _Parsed | str:
    parsed = _parse(path, data)
    if isinstance(parsed, str):
        return parsed
    problems = _mismatches(parsed.environment, environment())
    if problems:
        return f"{path} was written with another setup, its entries could not be used here: " + "; ".join(problems)
    return _entries_problem(path, parsed.payload) or parsed


def _load_into_torch(payload: bytes) -> Any:
    """torch.compiler.load_cache_artifacts, without unpickling any entry now.

    With Triton bundling on (torch's default), torch unpickles every FX graph entry while loading
    just to write its Triton kernels; the same happens anyway when a graph hits that entry
    (FxGraphCache.cache_hit_post_compile), so loading skips it and only writes the entries.
    """
    from torch._inductor import config

    if not hasattr(config, "bundle_triton_into_fx_graph_cache"):
        return torch.compiler.load_cache_artifacts(payload)
    with config.patch(bundle_triton_into_fx_graph_cache=False):
        return torch.compiler.load_cache_artifacts(payload)


def _write_file(target: str, content: bytes) -> None:
    """Write `target` atomically (temp file + rename); the temp file never outlives a failure."""
    handle, temporary = _new_file(os.path.dirname(target), ".fastcache-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _restore_kernels(root: str, kernels: dict[str, bytes]) -> int:
    """Write kernel files missing from the cache directory `root`; returns how many were written.

    Mode 0644 (less under a stricter umask): the loader maps a shared object readable, without the
    execute bit (dlopen needs none); nothing in the cache is meant to be run as a program.
    """
    written = 0
    for name, content in kernels.items():
        target = os.path.join(root, *name.split("/"))
        if os.path.exists(target):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _write_file(target, content)
        written += 1
    return written


def load_compile_cache(path: str | os.PathLike[str], *, trusted: bool = False) -> CompileCacheReport:
    """Load a file from `save_compile_cache` into the local compile caches; call it before warmup.

    Never raises for a bad file: a missing, unreadable, damaged, incompatible, untrusted or crafted
    file returns a report with ``loaded=False`` and the reason (also logged at WARNING), nothing
    is written, and the graphs then compile from scratch as without it. The report is truthy when
    the entries were loaded.

    The file is code: it is loaded only when it and the local cache directory are owned by this
    user (or root) and not writable by group or others. ``trusted=True`` skips that ownership
    check (for a file you know, e.g. one shipped in an image under another owner), never the
    checks of its entries. Also points inductor's cache at a per-user directory when none was
    chosen (see `use_private_cache_dir`).
    """
    path = os.fspath(path)
    if not hasattr(torch.compiler, "load_cache_artifacts"):
        return _not_loaded(path, f"torch {torch.__version__} cannot load a portable compile cache (torch >= 2.7)")
    try:
        root = use_private_cache_dir()
    except OSError as error:  # not even torch's default directory can be created
        return _not_loaded(path, f"no usable compile cache directory: {error}")
    data = _read(path, trusted)
    if isinstance(data, str):
        return _not_loaded(path, data)
    try:
        checked = _check(path, data)
    except Exception as error:  # an input no rule foresaw: still a report, never an exception
        checked = f"{path} could not be checked ({type(error).__name__}: {error})"
    if isinstance(checked, str):
        return _not_loaded(path, checked)
    problem = _cache_dir_problem(root, trusted)
    if problem:
        return _not_loaded(path, problem, checked.environment)
    try:
        info = _load_into_torch(checked.payload)
    except Exception as error:  # torch found the payload unusable after every check passed
        return _not_loaded(path, f"torch could not load {path}: {type(error).__name__}: {error}", checked.environment)
    if info is None:
        return _not_loaded(path, f"torch could not read the entries of {path} (damaged)", checked.environment)
    counts = {kind: len(keys) for kind, keys in info.artifacts.items() if keys}
    counts["cpp_kernel_files"] = len(checked.kernels)
    try:
        _restore_kernels(root, checked.kernels)
    except OSError as error:  # the graphs' entries are in; kernels would be built again
        logger.warning("compile cache %s: C++ kernels not restored (%s); they will be built again", path, error)
    from torch._inductor import config as inductor_config

    if not inductor_config.fx_graph_cache:
        logger.warning("inductor's FX graph cache is off (fx_graph_cache / TORCHINDUCTOR_FX_GRAPH_CACHE): "
                       "the loaded entries will not be used")
    logger.info("loaded compile cache %s: entries %s", path, counts)
    return CompileCacheReport(path, True, "", counts, len(data), checked.environment)


def _cache_dir_problem(root: str, trusted: bool) -> str | None:
    """Why the cache directory may not receive the entries (unsafe, or not creatable), or None."""
    try:
        if not os.path.isdir(root):
            _make_private_dirs(root)
        status = os.stat(root)
    except OSError as error:
        return f"cannot use the compile cache directory {root}: {error}"
    if trusted:
        return None
    return _trust_problem(status, "the compile cache directory", root,
                          "point TORCHINDUCTOR_CACHE_DIR at a directory of your own")
