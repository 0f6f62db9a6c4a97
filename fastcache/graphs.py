"""CUDA Graph capture and replay of a split's two functions, one pair of graphs per shape key.

For each shape key: static input buffers (cloned from the first call), the full graph (its
outputs are the noise buffer and the *kept* buffer, both allocated once at capture), and the
shallow graph, captured reading that same kept buffer. A refresh replay rewrites the kept buffer in
place, so a cached replay reads the features of the latest refresh with no copy. Every graph of
every shape shares one memory pool. Replay is: copy inputs into the static buffers, replay, return
a clone of the output (the clone belongs to the caller; the static buffer is overwritten by the
next replay).

Why one pool is safe: a graph captured later may place its outputs in blocks that an earlier
graph used for temporaries, so replaying the earlier graph overwrites them. Only one output must
survive other replays, the kept buffer of a shape, from its refresh to its cached steps; and the
dispatcher runs a cached step only at the shape of the last refresh (dispatch.py), so no other
shape's graph replays in between. Every other output is cloned right after its replay.

Devices and streams. Everything runs under ``torch.cuda.device(<the U-Net's device>)`` on streams
made there: a U-Net on ``cuda:1`` while ``cuda:0`` is current would otherwise be captured from
``cuda:0``'s stream, an empty graph whose replays return the capture-time output. The runner owns
two streams on that device. Warm-ups and captures run on the *side* stream (one stream for every
capture, as torch asks of captures sharing a pool). Input copies and replays run on the *replay*
stream, which first waits for the caller's current stream; the caller's stream then waits for it,
and the output is cloned on the caller's stream, after which the replay stream waits for that
clone. So calls from threads that each run under their own ``torch.cuda.stream`` are ordered on
the GPU, not only on the host (the handle's call lock), and no step waits for the GPU.

Runs before a capture: each function runs `WARMUP_RUNS` times first (on the side stream), then is
captured; under emulation the same warm-ups run, then the recording run. Those runs must leave the
graph inputs as they found them, because a function may write into its inputs: FreeU scales the
kept features in place on every cached step at a branch in the two deepest up blocks (eager and
DeepCache do too, so every cached step scales them once more, and replays must as well). The
inputs are therefore saved before the warm-ups and put back after the capture.

Captures in a threaded process. Captures take a process-wide lock (`CAPTURE_LOCK`), so two
fastcache handles never capture at once, and use ``capture_error_mode="thread_local"``, so that
another thread's allocations or syncs neither fail nor break the capture. Another thread's cuBLAS
work is not safe during a capture, though: the workspace clearing below (inductor's too) frees
every thread's workspace, and a GEMM launched just then can read a freed one. Any capture also
makes the capturing call wait for the GPU (``torch.cuda.graph`` synchronises). So a threaded
server warms up every shape at start and runs with ``strict=True``: no capture ever happens while
serving (strict raises on an unwarmed shape instead).

A capture that CUDA aborts (an op that is illegal while capturing, in a user's attention
processor, say) makes ``capture_end`` raise before torch's allocator leaves capture mode, and torch
documents that the allocator can then be in "all kinds of weird states" for the process. So after
one (`CaptureAborted`, which names the first error inside the capture rather than CUDA's echo of
it) fastcache captures nothing more in the process: prepared shapes keep replaying, new shapes are
refused with that reason, and a restart (or ``cuda_graphs=False``) is the way on.

Global math settings (TF32, the SDPA backend) are read once, at capture: set them before warm-up.
Autocast is part of the shape key, and warm-ups and capture run with its weight-cast cache off.

cuBLAS workspaces: cuBLAS keeps one workspace per (handle, stream), allocated on first use. The
warm-ups create one for the side stream in the ordinary pool; the capture would reuse it (a graph
reading memory that is not its pool's) or create one inside the pool that outlives the graphs
(so `release` could never free the pool, and `memory` would count it for ever). As inductor's
cudagraph trees do, the workspaces are cleared before and after each capture: the capture gets a
workspace of its own in the pool, which after it is one more temporary of that graph.

``emulate=True`` keeps all of this but replaces ``torch.cuda.CUDAGraph`` and the streams, so that
the buffer plumbing is testable on a CPU. An eager split is *recorded* at capture (recording.py:
the aten ops it ran, every tensor it read by reference, every Python value it read baked in as a
constant) and replays run that recording into the same output tensors: like a CUDA Graph, a replay
sees new values in the tensors it read at capture and nothing else, so a setting read from a
Python attribute and changed later (FreeU's factors, say) gives stale results here too, not only
on a GPU. A compiled split is re-run instead (its generated code runs below the recorder's reach);
dynamo's guards then recompile where a CUDA Graph would be stale.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .recording import Recording
from .runtime import CompiledFunctions, MemoryReport, Runner, Split, not_warmed_error, tensor_bytes
from .unet_call import StepInputs, autocast_dtype

# Runs of each function before capture: the first compiles and autotunes, the second lets lazy
# initialisation (cuDNN/cuBLAS handles, allocator growth) settle outside the graph.
WARMUP_RUNS = 2

# Held for every warm-up + capture in the process (see the module docstring).
CAPTURE_LOCK = threading.Lock()


class CaptureAborted(RuntimeError):
    """CUDA aborted a graph capture; the process's allocator may be left mid-capture."""


_capture_aborted: str | None = None  # why this process captures no more graphs (see the module docstring)


@contextlib.contextmanager
def cuda_capture(graph: Any, pool: Any, stream: Any) -> Iterator[None]:
    """``torch.cuda.graph``, telling CUDA's refusal to end the capture (CaptureAborted, naming the
    first error inside the capture, and no capture in this process after it) from an exception of
    the captured function that CUDA ended cleanly (raised as it is)."""
    global _capture_aborted
    if _capture_aborted is not None:
        raise CaptureAborted(f"an earlier capture in this process was aborted by CUDA ({_capture_aborted}), "
                             "so fastcache captures no more graphs in it; restart the process, or accelerate "
                             "with cuda_graphs=False")
    context = torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local")
    context.__enter__()
    try:
        yield
    except BaseException as inside:
        try:
            context.__exit__(type(inside), inside, inside.__traceback__)
        except BaseException as ending:
            _capture_aborted = f"{type(inside).__name__}: {inside}"
            raise CaptureAborted(f"CUDA aborted the capture ({type(ending).__name__}: {ending}); the first "
                                 f"error inside it: {_capture_aborted}. fastcache captures no more graphs in "
                                 "this process (torch's allocator may be left mid-capture)") from inside
        raise
    try:
        context.__exit__(None, None, None)
    except BaseException as ending:
        _capture_aborted = f"{type(ending).__name__}: {ending}"
        raise CaptureAborted(f"CUDA aborted the capture ({_capture_aborted}). fastcache captures no more graphs "
                             "in this process (torch's allocator may be left mid-capture)") from ending


def _as_tuple(value: Any) -> tuple[Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def graph_pool_bytes(segments: list[dict[str, Any]], pool: Any) -> int:
    """Bytes of the allocator segments (``torch.cuda.memory_snapshot()``) owned by `pool`."""
    return sum(int(segment["total_size"]) for segment in segments if tuple(segment["segment_pool_id"]) == tuple(pool))


def clear_cublas_workspaces() -> None:
    """Free every cuBLAS and cuBLASLt workspace (all handles and streams; they are made again on
    next use). A no-op on builds without CUDA."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


@contextlib.contextmanager
def autocast_without_cache(device_type: str) -> Iterator[None]:
    """Autocast as the caller has it, minus its weight-cast cache. A capture that hits the cache
    records no cast and reads the cached copies, which autocast frees when its region ends: later
    replays would read freed memory (torch's make_graphed_callables refuses the cache for this)."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
        yield


@contextlib.contextmanager
def cublas_workspaces_cleared() -> Iterator[None]:
    """Around a capture: it allocates its own workspace in its pool, and no workspace map entry
    keeps a block of the pool alive after it (what inductor's ``clear_cublas_manager`` does)."""
    clear_cublas_workspaces()
    try:
        yield
    finally:
        clear_cublas_workspaces()


class CapturedFunction:
    """A zero-argument function captured once; `replay` writes into the same `outputs`.

    `emulate`: None captures a CUDA Graph on the current device and stream (the caller chooses
    them); "record" records the function's aten ops and replays the recording (recording.py);
    "rerun" replays by calling the function again.
    """

    def __init__(self, function: Callable[[], Any], pool: Any, emulate: str | None) -> None:
        self._graph: Any = None
        self._replay_function: Callable[[], Any] | None = None
        if emulate == "record":
            recording = Recording(function)
            self._replay_function = recording
            self.outputs = recording.first_result
        elif emulate == "rerun":
            self._replay_function = function
            self.outputs = function()
        else:
            self._graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.current_stream()
            with cublas_workspaces_cleared(), cuda_capture(self._graph, pool, stream):
                self.outputs = function()

    def replay(self) -> None:
        if self._graph is not None:
            self._graph.replay()
            return
        assert self._replay_function is not None
        for static, fresh in zip(_as_tuple(self.outputs), _as_tuple(self._replay_function())):
            static.copy_(fresh)


class DeviceStreams:
    """The U-Net's device and the two streams a GraphRunner owns there (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            self.replay = torch.cuda.Stream(device)
            self.side = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """The body runs on the replay stream, on the U-Net's device, after everything the
        caller's stream has queued; the caller's stream then waits for it. No host sync."""
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            self.replay.wait_stream(caller)
            try:
                with torch.cuda.stream(self.replay):
                    yield
            finally:
                caller.wait_stream(self.replay)

    @contextlib.contextmanager
    def on_side(self) -> Iterator[None]:
        """Warm-ups and capture: on the side stream, ordered after and before the current one."""
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        try:
            with torch.cuda.stream(self.side):
                yield
        finally:
            current.wait_stream(self.side)

    def hand_back(self, output: Tensor) -> Tensor:
        """A copy of a static output for the caller, made on the caller's stream (which waited for
        the replay) so the caller's allocator pool owns it; the next replay, whichever stream
        calls it, waits until the copy is made."""
        with torch.cuda.device(self.device):
            copy = output.clone()
            self.replay.wait_stream(torch.cuda.current_stream(self.device))
        return copy


class HostStreams:
    """Emulated graphs: the host runs everything in order, so there is nothing to order."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def replaying(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def on_side(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @staticmethod
    def hand_back(output: Tensor) -> Tensor:
        return output.clone()


class ShapeGraphs:
    """Static inputs and the captured graphs of one shape key."""

    def __init__(self, inputs: StepInputs) -> None:
        self.static = inputs.clone()
        self.static_tensors = self.static.tensors()
        self.full: CapturedFunction | None = None
        self.shallow: CapturedFunction | None = None

    def load(self, inputs: StepInputs) -> None:
        """Copy this call's inputs into the static buffers (device copies, no sync)."""
        for name, tensor in inputs.tensors().items():
            self.static_tensors[name].copy_(tensor)

    @property
    def kept(self) -> Tensor:
        assert self.full is not None
        return self.full.outputs[1]


class TgateShape:
    """TGATE's graphs of one shape key: static inputs, one graph per (full or shallow, attention
    actions), and the key's kept-features buffer, which every full graph of the key writes and every
    shallow graph reads (the latest refresh at the key may be any of its full graphs)."""

    def __init__(self, inputs: StepInputs) -> None:
        self.static = inputs.clone()
        self.static_tensors = self.static.tensors()
        self.kept: Tensor | None = None  # allocated at the first full graph's first warm-up run
        # (refresh, actions) -> (graph, cache buffers it reads by name, cache buffers it writes by name)
        self.graphs: dict[tuple[bool, tuple[str, str, str]], tuple[CapturedFunction, dict[str, Tensor], dict[str, Tensor]]] = {}

    def load(self, inputs: StepInputs) -> None:
        for name, tensor in inputs.tensors().items():
            self.static_tensors[name].copy_(tensor)


class GraphRunner(Runner):
    """Replays captured graphs of the (compiled or eager) split; see the module docstring."""

    def __init__(
        self, split: Split, compiled: CompiledFunctions | None, emulate: bool = False
    ) -> None:
        super().__init__()
        self.split = split
        self.compiled = compiled
        self.emulate = emulate
        self.captures = 0
        self._shapes: dict[Hashable, ShapeGraphs] = {}
        # TGATE: graphs per shape key; the attention caches as static buffers outside the pool, by
        # (name, shape, dtype), written in place by the graphs that store them and read by reference
        # by those that reuse them; and the buffer each name was last written to.
        self._tgate: dict[Hashable, TgateShape] = {}
        self._tgate_buffers: dict[tuple[str, tuple[int, ...], torch.dtype], Tensor] = {}
        self._tgate_latest: dict[str, Tensor] = {}
        self._pool: Any = None  # one graph memory pool for every capture (CUDA only)
        self._streams: DeviceStreams | HostStreams | None = None  # made at the first call

    # -- Runner interface ------------------------------------------------------------------------
    def is_prepared(self, key: Hashable, refresh: bool) -> bool:
        graphs = self._shapes.get(key)
        return graphs is not None and (graphs.full if refresh else graphs.shallow) is not None

    def refresh(self, key: Hashable, inputs: StepInputs) -> Tensor:
        streams = self._streams_on(inputs.sample.device)
        with streams.replaying():
            graphs = self._shapes.get(key)
            if graphs is None:
                graphs = self._capture_full(key, inputs)
            graphs.load(inputs)
            assert graphs.full is not None
            graphs.full.replay()
        return streams.hand_back(graphs.full.outputs[0])

    def cached(self, key: Hashable, inputs: StepInputs) -> Tensor:
        streams = self._streams_on(inputs.sample.device)
        with streams.replaying():
            graphs = self._shapes[key]  # the dispatcher refreshed this key earlier in the call
            if graphs.shallow is None:
                self._capture_shallow(key, graphs)
            graphs.load(inputs)
            assert graphs.shallow is not None
            graphs.shallow.replay()
        return streams.hand_back(graphs.shallow.outputs)

    def tgate_prepared(self, key: Hashable, refresh: bool, actions: tuple[str, str, str]) -> bool:
        shape = self._tgate.get(key)
        return shape is not None and (refresh, actions) in shape.graphs

    def tgate_caches(self) -> Mapping[str, Tensor]:
        return self._tgate_latest

    def adopt_tgate_caches(self, caches: Mapping[str, Tensor]) -> None:
        """Another runner's attention outputs, copied into the static buffers the graphs read (the
        same buffer objects: captured graphs hold their addresses)."""
        for name, value in caches.items():
            buffer = self._tgate_latest.get(name)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                index = (name, tuple(value.shape), value.dtype)
                buffer = self._tgate_latest[name] = self._tgate_buffers.setdefault(index, torch.empty_like(value))
            if buffer is not value:
                buffer.copy_(value)

    def run_tgate(self, refresh: bool, key: Hashable, inputs: StepInputs, actions: tuple[str, str, str]) -> Tensor:
        """A TGATE step: replay (capturing on first use) the graph of (key, refresh, actions).

        Cache buffers live outside the graph pool, so no graph's temporaries can overwrite them
        between the step that stores an attention output and the steps that reuse it (those run at
        another shape key after the gate: the unguided half)."""
        streams = self._streams_on(inputs.sample.device)
        with streams.replaying():
            shape = self._tgate.get(key)
            if shape is None:
                self._check_new(key, "full" if refresh else "shallow")
                shape = self._tgate[key] = TgateShape(inputs)
            entry = shape.graphs.get((refresh, actions))
            if entry is None:
                shape.load(inputs)
                entry = self._capture_tgate(key, shape, refresh, actions)
            graph, reads, writes = entry
            for name, buffer in reads.items():
                if self._tgate_latest.get(name) is not buffer:
                    raise RuntimeError(f"fastcache TGATE: the graph reading {name} was captured with another buffer")
            shape.load(inputs)
            graph.replay()
            self._tgate_latest.update(writes)
        return streams.hand_back(graph.outputs)

    def _capture_tgate(
        self, key: Hashable, shape: TgateShape, refresh: bool, actions: tuple[str, str, str]
    ) -> tuple[CapturedFunction, dict[str, Tensor], dict[str, Tensor]]:
        self._check_new(key, "full_tgate" if refresh else "shallow_tgate", actions)
        reads = {name: self._tgate_latest[name] for name in self.split.tgate_reads(refresh, actions)}  # type: ignore[attr-defined]
        writes: dict[str, Tensor] = {}
        which = "full_tgate" if refresh else "shallow_tgate"
        if not refresh:
            assert shape.kept is not None, "the dispatcher refreshes before any cached step"
        kept_in = shape.kept

        def function() -> Tensor:
            args = shape.static.args()
            if refresh:
                noise, kept, stored = self._run(which, key, *args, actions, reads, variant=actions)
                if shape.kept is None:  # the first warm-up run, outside any capture
                    shape.kept = torch.empty_like(kept)
                shape.kept.copy_(kept)
            else:
                noise, stored = self._run(which, key, *args, kept_in, actions, reads, variant=actions)
            for name, value in stored.items():
                buffer = writes.get(name)
                if buffer is None:  # the first warm-up run, outside any capture
                    index = (name, tuple(value.shape), value.dtype)
                    buffer = writes[name] = self._tgate_buffers.setdefault(index, torch.empty_like(value))
                buffer.copy_(value)
            return noise

        inputs = [*shape.static_tensors.values(), *reads.values()] + ([kept_in] if kept_in is not None else [])
        graph = self._capture(function, inputs)
        shape.graphs[(refresh, actions)] = (graph, reads, writes)
        return graph, reads, writes

    def release(self) -> None:
        """Drop every graph and buffer; on CUDA, hand the pool's segments back to the driver now
        (they are free once the graphs are gone, but stay reserved until the cache is emptied)."""
        had_pool = self._pool is not None
        self._tgate.clear()
        self._tgate_buffers.clear()
        self._tgate_latest.clear()
        self._shapes.clear()
        self._pool = None
        self._streams = None
        if had_pool:
            with CAPTURE_LOCK:  # torch refuses to empty the cache while a capture is under way
                torch.cuda.empty_cache()

    def memory(self) -> MemoryReport:
        """Static buffers of every shape, and on CUDA the graph pool's segments. The graphs'
        outputs and kept features are allocated inside the pool during capture, so on CUDA they
        are part of `graph_pool` (counted there, not again in `total`); TGATE's are not."""
        inputs = outputs = kept = 0
        for graphs in self._shapes.values():
            inputs += tensor_bytes(graphs.static_tensors.values())
            if graphs.full is not None:
                outputs += tensor_bytes(_as_tuple(graphs.full.outputs)[:1])
                kept += tensor_bytes([graphs.kept])
            if graphs.shallow is not None:
                outputs += tensor_bytes(_as_tuple(graphs.shallow.outputs))
        tgate = tensor_bytes(self._tgate_buffers.values())  # TGATE: attention caches, kept buffers
        for shape in self._tgate.values():
            inputs += tensor_bytes(shape.static_tensors.values())
            tgate += tensor_bytes([shape.kept] if shape.kept is not None else [])
            outputs += tensor_bytes(_as_tuple(graph.outputs)[0] for graph, _, _ in shape.graphs.values())
        shapes = len(set(self._shapes) | set(self._tgate))
        pool = None if self._pool is None else graph_pool_bytes(torch.cuda.memory_snapshot(), self._pool)
        return MemoryReport(shapes, inputs, outputs, kept, pool, tgate)

    @property
    def compilations(self) -> int:
        return self.compiled.count if self.compiled is not None else 0

    # -- capture ---------------------------------------------------------------------------------
    def _streams_on(self, device: torch.device) -> DeviceStreams | HostStreams:
        if self._streams is None:
            self._streams = HostStreams(device) if self.emulate else DeviceStreams(device)
        assert self._streams.device == device, "a runner serves one device (accelerate rebuilds it on a move)"
        return self._streams

    def _run(self, which: str, key: Hashable, *args: Any, variant: Hashable = None) -> Any:
        """The split's `which` function, compiled where this runner compiles (graph: `key`, `variant`)."""
        if self.compiled is not None:
            return self.compiled.call(which, key, True, *args, variant=variant)
        return getattr(self.split, which)(*args)

    def _capture(self, function: Callable[[], Any], inputs: Sequence[Tensor]) -> CapturedFunction:
        """Warm up `function`, then capture it, under the process-wide lock, on the side stream.

        `inputs` (every tensor the function reads that outlives the capture: static buffers, the
        kept features) are saved first and put back last: the warm-ups and an emulated capture
        run the function, and a function that writes into its inputs (FreeU into the kept
        features) must find them, at its first replay, as the eager split would.
        """
        assert self._streams is not None
        emulation = None if not self.emulate else ("rerun" if self.compiled is not None else "record")
        with CAPTURE_LOCK, autocast_without_cache(self._streams.device.type):
            saved = [tensor.clone() for tensor in inputs]
            with self._streams.on_side():
                for _ in range(WARMUP_RUNS):
                    function()
                if not self.emulate and self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                captured = CapturedFunction(function, self._pool, emulation)
            for tensor, value in zip(inputs, saved):
                tensor.copy_(value)
        self.captures += 1
        return captured

    def _check_new(self, key: Hashable, which: str, plan: Hashable | None = None) -> None:
        if not self.may_prepare(key):
            warmed = [k for k, g in self._shapes.items() if g.full is not None]
            warmed += [k for k, shape in self._tgate.items() if any(refresh for refresh, _ in shape.graphs)]
            raise not_warmed_error(key, which, warmed, plan)

    def _capture_full(self, key: Hashable, inputs: StepInputs) -> ShapeGraphs:
        self._check_new(key, "full")
        graphs = ShapeGraphs(inputs)
        graphs.full = self._capture(
            lambda: self._run("full", key, *graphs.static.args()), list(graphs.static_tensors.values())
        )
        self._shapes[key] = graphs
        return graphs

    def _capture_shallow(self, key: Hashable, graphs: ShapeGraphs) -> None:
        self._check_new(key, "shallow")
        kept = graphs.kept
        graphs.shallow = self._capture(
            lambda: self._run("shallow", key, *graphs.static.args(), kept),
            [*graphs.static_tensors.values(), kept],
        )
