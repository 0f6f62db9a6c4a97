"""A compile cache file is code: who may have written it, what its entries may name, where it writes.

Fast (no compile): the files here are built by hand in torch's mega-cache format, with torch's own
writer (BytesWriter), around entries that torch's loader really acts on (an autotune entry is
written to ``<cache dir>/<key>``, an FX graph entry is unpickled while loading). The first tests
show that the crafted payloads are live attacks on torch's loader itself; the rest, that
`load_compile_cache` refuses them with nothing run and nothing written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import stat

import pytest
import torch
import torch._inductor.codecache
from torch._inductor.utils import BoxedBool
from torch.utils._appending_byte_serializer import BytesWriter

import fastcache
from fastcache import compile_cache

BEST_CONFIG = json.dumps({"XBLOCK": 64, "num_warps": 4, "num_stages": 1}).encode()
AUTOTUNE_KEY = "ab/cabc123.best_config"
KERNEL = ("cd/ccdkey.so", b"\x7fELF not really")


def _payload(*entries: tuple[str, str, bytes]) -> bytes:
    """torch's serialized mega-cache (format version 1) holding `entries` (kind, key, content)."""
    writer = BytesWriter()
    writer.write_uint64(1)
    groups: dict[str, list[tuple[str, bytes]]] = {}
    for kind, key, content in entries:
        groups.setdefault(kind, []).append((key, content))
    for kind, items in groups.items():
        writer.write_str(kind)
        writer.write_uint64(len(items))
        for key, content in items:
            writer.write_str(key)
            writer.write_bytes(content)
    return writer.to_bytes()


def _write(path, payload: bytes, files: tuple[tuple[str, bytes], ...] = (), **header_overrides) -> str:
    """A compile cache file: header (with `header_overrides`), payload, kernel `files` (name, content)."""
    header = {"format": compile_cache.FORMAT_VERSION, "environment": compile_cache.environment(),
              "torch_bytes": len(payload), "kernels": [[name, len(content)] for name, content in files]}
    header.update(header_overrides)
    with open(path, "wb") as file:
        file.write(compile_cache.MAGIC + json.dumps(header).encode() + b"\n" + payload)
        for _, content in files:
            file.write(content)
    os.chmod(path, 0o644)
    return str(path)


def _tree(root) -> set[str]:
    """Every file and folder under `root`, relative."""
    return {os.path.relpath(os.path.join(folder, name), root)
            for folder, folders, files in os.walk(root) for name in folders + files}


class _RunsCommand:
    """A pickle that runs a shell command when unpickled (the attack on torch's loader)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Calls:
    """A pickle that calls `function(*args)` when unpickled."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """An explicit, private inductor cache directory per test; umask 022; no user cache touched."""
    root = tmp_path / "inductor"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    umask = os.umask(0o022)
    yield root
    os.umask(umask)


@pytest.fixture
def outside(tmp_path):
    """A folder outside the cache directory, standing for site-packages."""
    folder = tmp_path / "site-packages"
    folder.mkdir()
    return folder


def _valid_file(tmp_path) -> str:
    return _write(tmp_path / "valid.compile-cache", _payload(("autotune", AUTOTUNE_KEY, BEST_CONFIG)), (KERNEL,))


def _assert_refused(report, reason: str, cache_dir, before: set[str] = frozenset()) -> None:
    assert not report and not report.loaded, report
    assert reason in report.reason, report.reason
    assert _tree(cache_dir) == set(before), sorted(_tree(cache_dir) - set(before))


# --- References: a valid file loads; the crafted payloads are live against torch's loader ------------


def test_a_valid_hand_made_file_loads_its_entry_and_kernel(tmp_path, cache_dir):
    report = fastcache.load_compile_cache(_valid_file(tmp_path))
    assert report, report.reason
    assert report.artifacts == {"autotune": 1, "cpp_kernel_files": 1}
    assert (cache_dir / AUTOTUNE_KEY).read_bytes() == BEST_CONFIG
    assert (cache_dir / KERNEL[0]).read_bytes() == KERNEL[1]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_dir)  # an explicit directory is kept


def test_torch_itself_writes_an_absolute_autotune_key_outside_the_cache(cache_dir, outside):
    target = outside / "evil.pth"
    torch.compiler.load_cache_artifacts(_payload(("autotune", str(target), b'{"x": 1}')))
    assert target.read_bytes() == b'{"x": 1}'


def test_torch_itself_runs_a_pickled_fx_graph_entry_while_loading(tmp_path, cache_dir):
    """torch 2.13 unpickles an FX graph entry while loading it (to emit its Triton bundle). An
    older torch (2.11) writes it into the cache directory as it is, for the compile that reads its
    key to unpickle: a live attack either way."""
    marker = tmp_path / "ran"
    entry = pickle.dumps(_RunsCommand(f"touch {marker}"))
    with contextlib.suppress(Exception):  # torch then fails on what the command returned, too late
        torch.compiler.load_cache_artifacts(_payload(("inductor", "fabcdefgh", entry)))
    if hasattr(torch._inductor.codecache.FxGraphCache, "_emit_triton_bundle"):
        assert marker.exists()
    else:
        written = [path for path in cache_dir.rglob("*") if path.is_file()]
        assert not marker.exists() and any(path.read_bytes() == entry for path in written), written


# --- Who wrote it ----------------------------------------------------------------------------


def test_a_file_others_can_write_is_refused_unless_trusted(tmp_path, cache_dir):
    path = _valid_file(tmp_path)
    os.chmod(path, 0o666)
    report = fastcache.load_compile_cache(path)
    _assert_refused(report, "is writable by group or others (mode 0666)", cache_dir)
    assert f"chmod go-w {path}" in report.reason and "trusted=True" in report.reason
    assert fastcache.load_compile_cache(path, trusted=True), "trusted=True skips the ownership check"


def test_a_file_of_another_user_is_refused_unless_trusted(tmp_path, cache_dir, monkeypatch):
    path = _valid_file(tmp_path)
    if os.getuid() == 0:
        os.chown(path, 12345, -1)
    else:  # this user cannot give a file away: be someone else instead
        real = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real + 1)
    report = fastcache.load_compile_cache(path)
    _assert_refused(report, "is owned by uid", cache_dir)
    assert "trusted=True" in report.reason
    assert fastcache.load_compile_cache(path, trusted=True)


def test_a_cache_directory_others_can_write_is_refused_unless_trusted(tmp_path, cache_dir):
    path = _valid_file(tmp_path)
    os.chmod(cache_dir, 0o777)
    report = fastcache.load_compile_cache(path)
    _assert_refused(report, f"the compile cache directory {cache_dir} is writable by group or others", cache_dir)
    assert fastcache.load_compile_cache(path, trusted=True)


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_cache_directory_of_another_user_is_refused(tmp_path, cache_dir):
    os.chown(cache_dir, 12345, -1)
    report = fastcache.load_compile_cache(_valid_file(tmp_path))
    _assert_refused(report, f"the compile cache directory {cache_dir} is owned by uid 12345", cache_dir)


# --- Where the cache lives by default ----------------------------------------------------------------


def _private(folder) -> bool:
    return stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_without_a_chosen_directory_entries_go_to_a_private_per_user_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert fastcache.load_compile_cache(_valid_file(tmp_path))
    private = tmp_path / "xdg" / "fastcache" / "torchinductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(private)
    assert _private(private) and _private(private.parent)
    assert (private / AUTOTUNE_KEY).read_bytes() == BEST_CONFIG and (private / KERNEL[0]).exists()


def test_torchs_tmp_default_is_replaced_by_the_per_user_directory(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch writes there once used
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fastcache.load_compile_cache(_valid_file(tmp_path))
    private = tmp_path / "home" / ".cache" / "fastcache" / "torchinductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(private) and _private(private)
    assert (private / AUTOTUNE_KEY).exists()


def test_a_user_directory_is_kept_and_without_a_home_torchs_directory_too(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(mine))
    assert compile_cache.use_private_cache_dir() == str(mine)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # no HOME, no passwd entry: "~" stays "~"
    monkeypatch.setattr(compile_cache, "_local_cache_dir", lambda: "torch's own")
    assert compile_cache.use_private_cache_dir() == "torch's own"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


# --- Crafted entries: refused whole, nothing run, nothing written -------------------------------------


def test_an_absolute_autotune_key_is_refused_and_nothing_is_written(tmp_path, cache_dir, outside):
    target = outside / "evil.pth"
    path = _write(tmp_path / "f", _payload(("autotune", AUTOTUNE_KEY, BEST_CONFIG),
                                            ("autotune", str(target), b'{"x": 1}')), (KERNEL,))
    report = fastcache.load_compile_cache(path)
    _assert_refused(report, f"autotune entry named {str(target)!r}, which is not a plain name", cache_dir)
    assert not target.exists() and not list(outside.iterdir())


@pytest.mark.parametrize("kind, key", [
    ("autotune", "../../evil.best_config"),
    ("autotune", "ab/cd/evil.best_config"),  # an extra sub-folder
    ("autotune", "ab/evil.pth"),  # not an autotune file
    ("aot_autograd", "../escape"),
    ("aot_autograd", "/abs"),
    ("inductor", "f/../../x"),
    ("inductor", "fab\x00cd"),
    ("inductor", "f" * 300),
    ("pgo", "../code"),
])
def test_an_entry_name_outside_the_cache_layout_is_refused(tmp_path, cache_dir, kind, key):
    path = _write(tmp_path / "f", _payload(("autotune", AUTOTUNE_KEY, BEST_CONFIG), (kind, key, b"{}")))
    _assert_refused(fastcache.load_compile_cache(path), "which is not a plain name inside the cache", cache_dir)


@pytest.mark.parametrize("kind", ["precompile", "evil"])
def test_an_entry_kind_fastcache_does_not_know_is_refused(tmp_path, cache_dir, kind):
    path = _write(tmp_path / "f", _payload(("autotune", AUTOTUNE_KEY, BEST_CONFIG), (kind, "abc", b"x")))
    _assert_refused(fastcache.load_compile_cache(path), f"has an entry of kind {kind!r}", cache_dir)


def test_an_autotune_entry_that_is_not_json_is_refused(tmp_path, cache_dir):
    path = _write(tmp_path / "f", _payload(("autotune", AUTOTUNE_KEY, b"\x80\x04not json")))
    _assert_refused(fastcache.load_compile_cache(path), "that is not a JSON object", cache_dir)


@pytest.mark.parametrize("name", [
    "/tmp/x.so", "ab/../../x.so", "../ab/x.so", "ab/cd/x.so", "ab/.hidden", "ab/x\x00.so", "abc/x.so",
    "ab/" + "x" * 300,
])
def test_a_kernel_name_outside_the_cache_layout_is_refused(tmp_path, cache_dir, name):
    path = _write(tmp_path / "f", _payload(("autotune", AUTOTUNE_KEY, BEST_CONFIG)), (KERNEL, (name, b"x")))
    _assert_refused(fastcache.load_compile_cache(path), "names a kernel file outside the cache directory", cache_dir)


def _pickled_entry_file(tmp_path, content: bytes, kind: str = "inductor") -> str:
    key = "fabcdefgh" if kind == "inductor" else "aabcdefgh"
    return _write(tmp_path / "f", _payload(("autotune", AUTOTUNE_KEY, BEST_CONFIG), (kind, key, content)), (KERNEL,))


@pytest.mark.parametrize("kind", ["inductor", "aot_autograd", "pgo"])
def test_a_pickle_that_runs_a_command_is_refused_without_running_it(tmp_path, cache_dir, kind):
    marker = tmp_path / "ran"
    path = _pickled_entry_file(tmp_path, pickle.dumps(_RunsCommand(f"touch {marker}")), kind)
    report = fastcache.load_compile_cache(path)
    _assert_refused(report, f"names {os.system.__module__}.system, which is not one of torch's", cache_dir)
    assert not marker.exists()


@pytest.mark.parametrize("function, args, reason", [
    (exec, ("open('{marker}', 'w')",), "names builtins.exec"),
    (__import__, ("subprocess",), "names builtins.__import__"),
    # allowed packages, but a function call or a constructor with effects is never what an entry does
    (torch._inductor.codecache.write_atomic, ("{marker}", b"x"), "calls the function torch._inductor.codecache"),
    (torch._inductor.codecache.DLLWrapper, ("{marker}",), "calls torch._inductor.codecache.DLLWrapper(...)"),
])
def test_a_pickle_that_calls_anything_but_containers_is_refused(tmp_path, cache_dir, function, args, reason):
    marker = tmp_path / "ran"
    args = tuple(arg.format(marker=marker) if isinstance(arg, str) else arg for arg in args)
    report = fastcache.load_compile_cache(_pickled_entry_file(tmp_path, pickle.dumps(_Calls(function, *args))))
    _assert_refused(report, reason, cache_dir)
    assert not marker.exists()


def test_a_pickle_with_a_persistent_id_or_garbage_is_refused(tmp_path, cache_dir):
    class Persistent(pickle.Pickler):
        def persistent_id(self, obj):
            return "x" if obj == "secret" else None

    buffer = io.BytesIO()
    Persistent(buffer).dump(["secret"])
    report = fastcache.load_compile_cache(_pickled_entry_file(tmp_path, buffer.getvalue()))
    _assert_refused(report, "uses a persistent id", cache_dir)
    report = fastcache.load_compile_cache(_pickled_entry_file(tmp_path, b"\x80\x04garbage"))
    _assert_refused(report, "is not a readable pickle", cache_dir)


def _enum_member_with_state() -> bytes:
    """MutationType.NOT_MUTATED, then BUILD {"attr": 1} on it: would set an attribute on torch's enum."""
    from torch._functorch._aot_autograd.schemas import MutationType

    member = pickle.dumps(MutationType.NOT_MUTATED, protocol=4)
    assert member.endswith(b".")
    return member[:-1] + b"}\x8c\x04attr\x94K\x01sb."


@pytest.mark.parametrize("content, reason", [
    # BUILD on a class it names: torch's unpickler would setattr on FxGraphCache for the whole process
    (b"ctorch._inductor.codecache\nFxGraphCache\n(N}Vattr\nI1\nstb.", "sets the state of the class"),
    (b"ctorch._inductor.codecache\nFxGraphCache\n(I1\ne.", "adds items to the class"),
    (_enum_member_with_state(), "sets the state of what torch._functorch._aot_autograd.schemas.MutationType(...)"),
])
def test_a_pickle_that_changes_torchs_own_objects_is_refused(tmp_path, cache_dir, content, reason):
    report = fastcache.load_compile_cache(_pickled_entry_file(tmp_path, content))
    _assert_refused(report, reason, cache_dir)


def test_python2_renames_in_old_pickles_start_only_from_refused_names():
    """torch's unpickler renames Python 2 globals (_compat_pickle); the scan checks names before that."""
    import _compat_pickle

    def allowed(module: str) -> bool:
        return module in ("builtins", "collections", "torch", "torch._utils") or compile_cache._in_packages(module)

    assert not [key for key in _compat_pickle.NAME_MAPPING if allowed(key[0])]
    assert not [module for module in _compat_pickle.IMPORT_MAPPING if allowed(module)]


def _pgo_code_state() -> bytes:
    """What dynamo's PGO writes (put_local_code_state): a filled defaultdict of its dataclasses and enums."""
    import collections

    from torch._dynamo import pgo

    sizes = pgo.FrameStateSizeEntry.make_size((1, 2))
    sizes |= pgo.FrameStateSizeEntry.make_size((3, 2))  # a dynamic dimension: AutoDynamic
    code = pgo.CodeState()
    code.automatic_dynamic["x"] = sizes
    state = collections.defaultdict(pgo.CodeState)
    state[pgo.CodeId("/app/model.py", 1, "forward", "hash")] = code
    return pickle.dumps(state)


def test_a_pgo_entry_and_filled_containers_pass_the_scan(tmp_path, cache_dir):
    import collections

    containers = [collections.OrderedDict(a=1), collections.Counter("aab"), collections.deque([1]), {1, 2},
                  frozenset([3]), torch.Size([1, 2]), torch.device("cpu"), torch.float16, slice(1, 2)]
    assert compile_cache._pickle_problem(pickle.dumps(containers)) is None
    path = _write(tmp_path / "f", _payload(("pgo", "0:job-1", _pgo_code_state())))
    report = fastcache.load_compile_cache(path)
    assert report and report.artifacts == {"pgo": 1, "cpp_kernel_files": 0}, report.reason


def test_a_bound_method_of_an_object_it_built_and_signatures_pass_the_scan():
    """What a triton kernel (JITFunction) brings on CUDA: defaultdict(self.create_binder), inspect signatures."""
    import collections
    import inspect

    from torch._inductor.utils import IndentedBuffer

    buffer = IndentedBuffer()
    assert compile_cache._pickle_problem(pickle.dumps(collections.defaultdict(buffer.getvalue))) is None
    signature = inspect.signature(lambda a, b=1, *args, c: 0)
    assert compile_cache._pickle_problem(pickle.dumps([signature, inspect.Parameter.empty])) is None


@pytest.mark.parametrize("target, name, reason", [
    (BoxedBool(True), "disable", "takes 'disable' of a torch._inductor.utils.BoxedBool, which is not one of its"),
    (BoxedBool(True), "__init__", "calls getattr for '__init__', which is not a public method name"),
    (BoxedBool, "disable", "takes 'disable' of an object it did not build"),  # the class itself
    ("text", "upper", "takes 'upper' of an object it did not build"),
])
def test_getattr_other_than_a_method_of_its_own_objects_is_refused(tmp_path, cache_dir, target, name, reason):
    content = pickle.dumps(_Calls(getattr, target, name))
    _assert_refused(fastcache.load_compile_cache(_pickled_entry_file(tmp_path, content)), reason, cache_dir)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels (and their pickles) exist only on CUDA")
def test_real_cuda_entries_pass_the_scan(tmp_path, monkeypatch):
    """torch's own CUDA entries (Triton bundle, static launcher, autotune) must never be refused."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()

    @torch.compile
    def function(x):
        return (x.sin() + 1).relu().sum(dim=-1) + x.cos().amax(dim=0)

    function(torch.randn(256, 256, device="cuda"))
    payload, info = torch.compiler.save_cache_artifacts()
    artifacts = compile_cache._read_artifacts(payload)
    assert {artifact.kind for artifact in artifacts} >= {"inductor", "aot_autograd"}, info
    assert [compile_cache._artifact_problem(artifact) for artifact in artifacts] == [None] * len(artifacts)


def _triton_bundle(kernel_hash="c2abcdef", device=0, filename="triton_poi_fused_0.cubin"):
    from torch._inductor.triton_bundler import TritonKernelArtifact, TritonKernelArtifacts

    return TritonKernelArtifacts(kernel_hash, device, [TritonKernelArtifact(filename, b"binary")])


def test_the_scan_accepts_a_triton_bundle_with_plain_names():
    assert compile_cache._pickle_problem(pickle.dumps(_triton_bundle())) is None


@pytest.mark.parametrize("fields, reason", [
    (dict(kernel_hash="../../escape"), "kernel_hash '../../escape' is not a plain name"),
    (dict(kernel_hash="/abs"), "kernel_hash '/abs' is not a plain name"),
    (dict(device="../x"), "device '../x' is not a plain name"),
    (dict(filename="/site-packages/evil.pth"), "filename '/site-packages/evil.pth' is not a plain name"),
    (dict(filename=".."), "filename '..' is not a plain name"),
])
def test_triton_kernel_names_that_torch_would_write_outside_are_refused(tmp_path, cache_dir, fields, reason):
    report = fastcache.load_compile_cache(_pickled_entry_file(tmp_path, pickle.dumps(_triton_bundle(**fields))))
    _assert_refused(report, reason, cache_dir)


# --- Malformed headers: reported, never raised, nothing left behind ----------------------------------


@pytest.mark.parametrize("overrides, reason", [
    (dict(environment=["torch", "2.13"]), "its environment is not a JSON object"),
    (dict(environment=None), "its environment is not a JSON object"),
    (dict(environment={"torch": [[[[]]]] * 3}), "was written with another setup"),
    (dict(kernels={"ab/x.so": 1}), "incomplete header"),
    (dict(kernels=[["ab/x.so"]]), "incomplete header"),
    (dict(kernels=[[["ab"], 1]]), "incomplete header"),
    (dict(kernels=[["ab/x.so", True]]), "incomplete header"),
    (dict(torch_bytes="12"), "incomplete header"),
    (dict(format=True), "unreadable header"),
])
def test_a_malformed_header_is_reported_and_never_raises(tmp_path, cache_dir, overrides, reason):
    path = _write(tmp_path / "f", _payload(("autotune", AUTOTUNE_KEY, BEST_CONFIG)), **overrides)
    _assert_refused(fastcache.load_compile_cache(path), reason, cache_dir)
    assert sorted(os.listdir(tmp_path)) == ["f", "inductor"]  # no temp file next to it either


@pytest.mark.parametrize("header", [
    b"[" * 100000 + b"]" * 100000,
    b'{"format": 1, "environment": ' + b"[" * 100000 + b"]" * 100000 + b"}",
])
def test_a_deeply_nested_header_is_reported_and_never_raises(tmp_path, cache_dir, header):
    path = tmp_path / "f"
    path.write_bytes(compile_cache.MAGIC + header + b"\n")
    _assert_refused(fastcache.load_compile_cache(path), "unreadable header", cache_dir)


# --- What is written: modes, temp files, durability -------------------------------------------------


def test_restored_kernels_are_not_executable_nor_writable_by_others(tmp_path, cache_dir):
    os.umask(0o000)  # the mode is fastcache's, not the umask's (which may only remove bits)
    assert fastcache.load_compile_cache(_valid_file(tmp_path))
    assert stat.S_IMODE(os.stat(cache_dir / KERNEL[0]).st_mode) == 0o644


def test_a_failed_kernel_write_leaves_no_temp_file(tmp_path, cache_dir, monkeypatch, caplog):
    replace = os.replace

    def failing_replace(source, target, *args, **kwargs):
        if os.path.basename(source).startswith(".fastcache-"):
            raise OSError(28, "No space left on device")
        return replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    with caplog.at_level(logging.WARNING, logger="fastcache"):
        report = fastcache.load_compile_cache(_valid_file(tmp_path))
    assert report and "C++ kernels not restored" in caplog.text  # the graphs' entries are in
    assert not [name for name in _tree(cache_dir) if ".fastcache-" in name], sorted(_tree(cache_dir))
    assert not (cache_dir / KERNEL[0]).exists()


def _fake_save(monkeypatch, payload: bytes) -> None:
    from torch.compiler._cache import CacheInfo

    info = CacheInfo()
    info.artifacts["autotune"].append(AUTOTUNE_KEY)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (payload, info))
    monkeypatch.setattr(compile_cache, "_kernel_files", lambda: {})


def test_save_fsyncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    _fake_save(monkeypatch, _payload(("autotune", AUTOTUNE_KEY, BEST_CONFIG)))
    events, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(handle):
        events.append(("fsync", os.fstat(handle).st_ino))
        return fsync(handle)

    def recording_replace(source, target, *args, **kwargs):
        events.append(("replace", os.stat(source).st_ino))
        return replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    fastcache.save_compile_cache(tmp_path / "saved")
    renamed = next(inode for event, inode in events if event == "replace")
    assert events.index(("fsync", renamed)) < events.index(("replace", renamed)), events


def test_a_failed_save_leaves_no_temp_file(tmp_path, monkeypatch):
    _fake_save(monkeypatch, _payload(("autotune", AUTOTUNE_KEY, BEST_CONFIG)))

    def failing_fsync(handle):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    folder = tmp_path / "out"
    with pytest.raises(OSError, match="Input/output error"):
        fastcache.save_compile_cache(folder / "saved")
    assert os.listdir(folder) == []


def test_a_saved_file_is_never_group_writable_and_loads_back(tmp_path, cache_dir, monkeypatch):
    _fake_save(monkeypatch, _payload(("autotune", AUTOTUNE_KEY, BEST_CONFIG)))
    os.umask(0o002)  # user-private-group systems: open() would give 0664
    report = fastcache.save_compile_cache(tmp_path / "saved")
    assert stat.S_IMODE(os.stat(report.path).st_mode) == 0o644
    loaded = fastcache.load_compile_cache(report.path)
    assert loaded, loaded.reason
    assert (cache_dir / AUTOTUNE_KEY).read_bytes() == BEST_CONFIG
