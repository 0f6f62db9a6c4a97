"""Runtime mechanics: the runners that execute a split, compiled or not.

A runner executes a `Split` (two functions, full and shallow) for one shape key at a time: ``refresh`` runs the full function
and keeps its features, ``cached`` runs the shallow function on them. Three runners:

* `EagerRunner`: the split as plain PyTorch; the exact reference path (``compile=False``).
* `CompiledRunner`: both functions under ``torch.compile`` (``fullgraph=True``, static shapes).
  One dynamo cache entry per shape key; a new key compiles on first use (or raises in strict
  mode). Past RECOMPILE_LIMIT graphs a new one raises `ShapeLimitError` instead of compiling, and
  dynamo never falls back to eager on its own (accelerate.py decides what a shape past the limit
  runs).
* `GraphRunner` (in graphs.py): the compiled functions captured as CUDA Graphs per shape key.

None of them knows U-Net structure (unet_split.py), diffusers' call conventions (unet_call.py)
or when to refresh (dispatch.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Protocol

import torch
from torch import Tensor

from .errors import ShapeLimitError, ShapeNotWarmedError
from .unet_call import AUTOCAST, StepInputs

logger = logging.getLogger("fastcache")


class Split(Protocol):
    """What a runner runs: two functions of the same inputs (unet_split.UNetSplit is the one).

    ``full(sample, timestep, encoder_hidden_states, added) -> (noise, kept)`` runs the whole model
    and returns the features the cached steps reuse; ``shallow(..., kept) -> noise`` runs only
    the part that stays live on a cached step.
    """

    def full(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
             added: Mapping[str, Any]) -> tuple[Tensor, Tensor]: ...

    def shallow(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                added: Mapping[str, Any], kept: Tensor) -> Tensor: ...

# Per compiled function of one handle: how many graphs it compiles (one per shape key; TGATE's
# functions one per shape key and attention actions: dynamo, too, counts per function). A new
# graph past it raises ShapeLimitError without calling dynamo (whose own limit is set at least as
# high for fastcache's calls only, and counts across handles); see FastCache._run for what runs
# such a shape.
RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def autograd_off() -> Iterator[None]:
    """The autograd state fastcache's graphs always run in, whatever the caller's: ``no_grad``
    with inference mode off.

    Under a caller's ``torch.inference_mode`` every tensor made is an inference tensor, and the
    dispatch keys dynamo guards on change. Without a fixed state, static buffers and kept
    features made in a warm-up under inference mode could not be written by a later call outside
    it ("Inplace update to inference tensor outside InferenceMode"), and a graph compiled in one
    mode would recompile in the other (refused in strict serving).
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


def without_inference_tensors(value: Any) -> Any:
    """`value` (a tensor, or tuples, lists and dicts of them) with each inference tensor replaced
    by a normal copy, for a compiled function: dynamo guards on an input's dispatch keys, which
    differ for inference tensors, so feeding one after a warm-up with normal tensors recompiles.
    Run under `autograd_off` (a copy made in inference mode is an inference tensor again).
    Written out rather than with pytree's ``tree_map``: 1.7 instead of 7.9 us per U-Net call."""
    if torch.is_tensor(value):
        return value.clone() if value.is_inference() else value
    if isinstance(value, (tuple, list)):
        return type(value)(without_inference_tensors(item) for item in value)
    if isinstance(value, dict):
        return {name: without_inference_tensors(item) for name, item in value.items()}
    return value


def _key_entries(key: Hashable) -> tuple[str, dict[str, tuple[Any, str]]]:
    """A shape key's device, and each entry's shape and dtype name ("float32") by entry name."""
    device, *named = key  # type: ignore[misc]
    return device, {name: (shape, str(dtype).replace("torch.", "")) for name, shape, dtype in named}


def describe_key(key: Hashable) -> str:
    """A short human-readable form of a shape key, for error messages."""
    device, entries = _key_entries(key)
    shape, dtype = entries["sample"]
    text = f"batch {shape[0]}, latents {shape[1]}x{shape[2]}x{shape[3]}, {dtype} on {device}"
    if AUTOCAST in entries:
        text += f" under autocast to {entries[AUTOCAST][1]}"
    return text


def _sample_dtype(key: Hashable) -> str:
    return _key_entries(key)[1]["sample"][1]


def not_warmed_error(key: Hashable, which: str, warmed: Iterable[Hashable],
                     plan: Hashable | None = None) -> ShapeNotWarmedError:
    """The strict-serving error for a shape key that warm-up did not prepare (`warmed`: the keys
    it did), or, with TGATE's attention `plan`, a warmed key whose plan was not."""
    warmed = set(warmed)
    if plan is not None and key in warmed:
        return ShapeNotWarmedError(
            f"strict serving: {describe_key(key)} was warmed up, but not with this call's TGATE attention "
            f"plan {plan} ({which} U-Net). With sp_interval, fi_interval or warm_up the plans depend on the "
            "number of steps: warm up with num_inference_steps set to the count you serve, or accelerate "
            "with strict=False."
        )
    names = sorted({describe_key(k) for k in warmed}) or ["none"]
    dtypes = sorted({_sample_dtype(k) for k in warmed})
    if dtypes and _sample_dtype(key) not in dtypes:
        advice = (f"This call's latents are {_sample_dtype(key)} and every warmed shape's {', '.join(dtypes)}: "
                  "plain diffusers fails on latents in another dtype than its U-Net's, so cast them (or, "
                  "for a U-Net converted on purpose, warm up at this dtype).")
    else:
        advice = ("Call warmup() with this height, width and batch size first, or accelerate with strict=False "
                  "to compile new shapes on first use.")
    return ShapeNotWarmedError(
        f"strict serving: no graph was warmed up for {describe_key(key)} ({which} U-Net); "
        f"warmed shapes: {'; '.join(names)}. {advice}"
    )


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@dataclass(frozen=True)
class MemoryReport:
    """Device memory a runner holds between U-Net calls, in bytes, over every prepared shape.

    Eager diffusers holds none of this between calls; it is what fastcache costs on top of the
    pipeline's weights, next to the activations each call allocates and frees (which the CUDA Graph
    pool keeps instead: ``graph_pool``).
    """

    shapes: int  # shape keys with buffers
    static_inputs: int  # CUDA Graph input buffers (the call's inputs are copied in)
    static_outputs: int  # CUDA Graph noise outputs (copied out to the caller at every call)
    kept_features: int  # the features a refresh keeps for the cached steps
    # Segments of the CUDA Graphs' private memory pool, shared by every captured graph: their
    # intermediate activations, and the outputs and kept features above, which capture allocates
    # there. None where no CUDA Graph is captured.
    graph_pool: int | None
    # TGATE's kept features and attention caches: outside the pool by design (graphs.py), so
    # counted on their own, pool or not.
    tgate_buffers: int = 0

    @property
    def total(self) -> int:
        if self.graph_pool is not None:  # the outputs and kept features live inside the pool
            return self.static_inputs + self.graph_pool + self.tgate_buffers
        return self.static_inputs + self.static_outputs + self.kept_features + self.tgate_buffers


class Runner:
    """Executes a split: ``refresh`` (full, keeps features) or ``cached`` (shallow) per call.

    Returned noise predictions belong to the caller. The kept features stay owned by the runner.
    """

    def __init__(self) -> None:
        self.allow_new_shapes = True
        # Keys that may be prepared even when new shapes are not allowed: those a previous runner
        # served before the model changed (accelerate.py's _rebuild).
        self.rewarm_keys: frozenset[Hashable] = frozenset()
        # Eager and compiled runners: the features of the latest refresh (owned by the runner).
        self._kept: Tensor | None = None
        # TGATE: the attention outputs stored by earlier steps of the call, by name (tgate.py).
        self._tgate_caches: dict[str, Tensor] = {}

    def may_prepare(self, key: Hashable) -> bool:
        """Whether `key` may be compiled or captured now (strict serving refuses unwarmed shapes)."""
        return self.allow_new_shapes or key in self.rewarm_keys

    @property
    def compilations(self) -> int:
        """Graphs compiled so far (one per function and shape key)."""
        return 0

    def is_prepared(self, key: Hashable, refresh: bool) -> bool:
        """Whether running `key` now needs no compilation or capture."""
        return True

    def refresh(self, key: Hashable, inputs: StepInputs) -> Tensor:
        raise NotImplementedError

    def cached(self, key: Hashable, inputs: StepInputs) -> Tensor:
        raise NotImplementedError

    # -- TGATE (tgate.py): the split's full_tgate / shallow_tgate with static attention actions --
    def tgate_prepared(self, key: Hashable, refresh: bool, actions: tuple[str, str, str]) -> bool:
        return self.is_prepared(key, refresh)

    def run_tgate(self, refresh: bool, key: Hashable, inputs: StepInputs, actions: tuple[str, str, str]) -> Tensor:
        """One TGATE step: reads the caches its actions reuse, keeps the ones it stores."""
        split = self.split  # type: ignore[attr-defined]
        caches = {name: self._tgate_caches[name] for name in split.tgate_reads(refresh, actions)}
        if refresh:
            noise, self._kept, stored = self._tgate_call("full_tgate", key, actions, *inputs.args(), actions, caches)
        else:
            assert self._kept is not None, "the dispatcher refreshes before any cached step"
            noise, stored = self._tgate_call("shallow_tgate", key, actions, *inputs.args(), self._kept, actions, caches)
        self._tgate_caches.update(stored)
        return noise

    def tgate_caches(self) -> Mapping[str, Tensor]:
        """The attention outputs TGATE steps stored, by name: their latest values."""
        return self._tgate_caches

    def adopt_tgate_caches(self, caches: Mapping[str, Tensor]) -> None:
        """Take the attention outputs another runner's steps stored: a call whose shapes run on two
        runners (the guided batch compiled, the unguided half on the eager split past the graph
        limit, or the reverse) reads after the gate what was stored before it."""
        self._tgate_caches.update(caches)

    def _tgate_call(self, which: str, key: Hashable, actions: tuple[str, str, str], *args: Any) -> Any:
        """Run the split's `which` TGATE function on `args`; its graph is told apart from the
        function's other graphs by the shape `key` and the static `actions`."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop kept features, graphs and buffers."""

    def memory(self) -> MemoryReport:
        """What this runner holds between calls (here: the kept features of the latest refresh,
        and with TGATE the attention outputs kept)."""
        kept = [self._kept] if self._kept is not None else []
        return MemoryReport(len(kept), 0, 0, tensor_bytes(kept), None, tensor_bytes(self._tgate_caches.values()))


class EagerRunner(Runner):
    """Runs the split eagerly: the exact reference for every other runner.

    Nothing is compiled, but strict serving is honoured all the same: a shape key that warm-up
    (or an earlier call while new shapes were allowed) did not run raises ShapeNotWarmedError, so
    a server sees the same refusals with ``compile=False`` as with its compiled configuration.
    """

    def __init__(self, split: Split) -> None:
        super().__init__()
        self.split = split
        self._ran: set[Hashable] = set()

    def is_prepared(self, key: Hashable, refresh: bool) -> bool:
        return key in self._ran

    def refresh(self, key: Hashable, inputs: StepInputs) -> Tensor:
        if key not in self._ran and not self.may_prepare(key):
            raise not_warmed_error(key, "full", self._ran)
        noise, self._kept = self.split.full(*inputs.args())
        self._ran.add(key)
        return noise

    def cached(self, key: Hashable, inputs: StepInputs) -> Tensor:
        assert self._kept is not None, "the dispatcher refreshes before any cached step"
        return self.split.shallow(*inputs.args(), self._kept)

    def _tgate_call(self, which: str, key: Hashable, actions: tuple[str, str, str], *args: Any) -> Any:
        full = which == "full_tgate"
        if full and key not in self._ran and not self.may_prepare(key):
            raise not_warmed_error(key, which, self._ran)
        result = getattr(self.split, which)(*args)
        if full:
            self._ran.add(key)
        return result

    def release(self) -> None:
        self._kept = None
        self._tgate_caches.clear()
        self._ran.clear()


# Inductor options fastcache sets for graphs on a CPU unless the user's `compile_options` name them.
# layout_optimization (on by default) makes a convolution-heavy graph channels-last; on a CPU the
# fused group-norm kernels over that layout are far slower than eager's (32 ms against 0.1 ms for
# one of them), and turning it off made fastcache's denoising loop 1.14x (cpu-small) and 1.22x
# (SD 1.5 at 256 px) faster (bench/NOTES.md, "Inductor on a CPU"). On CUDA inductor's default stays.
CPU_INDUCTOR_DEFAULTS: dict[str, Any] = {"layout_optimization": False}


def compile_kwargs(backend: str, mode: str | None = None, inductor_options: Mapping[str, Any] | None = None,
                   device_type: str | None = None) -> dict[str, Any]:
    """torch.compile's arguments for every fastcache graph: whole graphs, static shapes (one graph
    per input shape), the configured backend and its mode or inductor options.

    Inductor always gets ``triton.cudagraphs=False``: its own CUDA Graphs (which
    ``TORCHINDUCTOR_CUDAGRAPHS=1`` turns on for every compile) would capture inside fastcache's.
    torch.compile takes a mode or options, not both, so a mode is passed as its options. For graphs
    on a CPU (`device_type` "cpu") `CPU_INDUCTOR_DEFAULTS` come first; the user's options win.
    """
    kwargs: dict[str, Any] = dict(fullgraph=True, dynamic=False, backend=backend)
    if backend == "inductor":
        from torch._inductor import list_mode_options

        options = dict(list_mode_options(mode, False)) if mode not in (None, "default") else {}
        if device_type == "cpu":
            options.update(CPU_INDUCTOR_DEFAULTS)
        options.update(inductor_options or {})
        options["triton.cudagraphs"] = False
        kwargs["options"] = options
        return kwargs
    if mode is not None:
        kwargs["mode"] = mode
    if inductor_options:
        kwargs["options"] = dict(inductor_options)
    return kwargs


class CompiledFunctions:
    """``torch.compile`` of a split's two functions, with per-shape-key bookkeeping.

    `call` compiles a new graph on first use (raising ShapeNotWarmedError instead when new shapes
    are not allowed, ShapeLimitError past RECOMPILE_LIMIT graphs of one function), and in strict
    serving runs known graphs with dynamo told to fail rather than recompile (ShapeNotWarmedError).
    A function has one graph per shape key, and TGATE's functions one per shape key and static
    attention actions (its `variant`): counted per function, as dynamo counts per code object.
    Dynamo's own limit is at least RECOMPILE_LIMIT for these calls and hitting it raises
    (ShapeLimitError): a U-Net never drops to eager inside dynamo.

    Every dynamo setting is changed for the calling thread only (`dynamo_policy`): torch's
    process-wide compiler stance and other threads' functions are never touched.
    """

    def __init__(self, split: Split, options: Mapping[str, Any]) -> None:
        """`options`: torch.compile's keyword arguments (`compile_kwargs`)."""
        self.split = split
        self.options = dict(options)  # what every graph here was compiled with
        self.functions: dict[str, Callable[..., Any]] = {
            "full": torch.compile(split.full, **options),
            "shallow": torch.compile(split.shallow, **options),
        }
        for name in ("full_tgate", "shallow_tgate"):
            if hasattr(split, name):
                self.functions[name] = torch.compile(getattr(split, name), **options)
        # Per function, its graphs: a shape key, or (shape key, variant) for TGATE's functions.
        self.compiled: dict[str, set[Hashable]] = {name: set() for name in self.functions}

    @property
    def count(self) -> int:
        return sum(len(graphs) for graphs in self.compiled.values())

    def is_compiled(self, which: str, key: Hashable, variant: Hashable = None) -> bool:
        return _graph(key, variant) in self.compiled[which]

    def call(self, which: str, key: Hashable, allow_new: bool, *args: Any, variant: Hashable = None) -> Any:
        """Run `which` at `key` (and `variant`); `allow_new`: whether a new graph may be compiled
        now. When it may not (strict serving), a known graph may not be compiled again either."""
        graph = _graph(key, variant)
        known = graph in self.compiled[which]
        if not known and not allow_new:
            warmed = {g[0] if variant is not None else g for g in self.compiled[which]} | self.compiled["full"]
            raise not_warmed_error(key, which, warmed, variant)
        if not known and len(self.compiled[which]) >= RECOMPILE_LIMIT:
            raise shape_limit_error(key, which)
        from torch._dynamo import exc

        # Both exist in torch 2.13; the tuple is empty where an older torch lacks one (never raised there).
        RecompileError = getattr(exc, "RecompileError", ())  # noqa: N806
        FailOnRecompileLimitHit = getattr(exc, "FailOnRecompileLimitHit", ())  # noqa: N806

        try:
            with dynamo_policy(fail_on_recompile=known and not allow_new):
                result = self.functions[which](*args)
        except RecompileError as error:  # strict serving, a known key whose guards failed
            raise ShapeNotWarmedError(
                f"strict serving: the warmed {which} U-Net graph for {describe_key(key)} would be "
                f"compiled again ({error}). Something the graph depends on changed outside "
                "fastcache's knowledge; call warmup() again, or accelerate with strict=False."
            ) from error
        except FailOnRecompileLimitHit as error:  # dynamo's count, shared by every handle, is full
            raise shape_limit_error(key, which, process_wide=True) from error
        if not known:
            self.compiled[which].add(graph)
        return result


def _graph(key: Hashable, variant: Hashable) -> Hashable:
    return key if variant is None else (key, variant)


def shape_limit_error(key: Hashable, which: str, process_wide: bool = False) -> ShapeLimitError:
    holder = (
        "dynamo already holds as many graphs of the U-Net functions as it allows per process (every "
        "fastcache handle and model change counts; torch._dynamo.config.accumulated_recompile_limit)"
        if process_wide
        else f"the {which} U-Net function of this handle already holds {RECOMPILE_LIMIT} graphs (one per "
        "shape; TGATE's, one per shape and attention plan; fastcache.runtime.RECOMPILE_LIMIT)"
    )
    return ShapeLimitError(f"{holder}, so {describe_key(key)} gets none")


@functools.lru_cache(maxsize=1)
def dynamo_config_is_thread_local() -> bool:
    """Whether ``torch._dynamo.config.patch`` changes the calling thread only (torch >= 2.13:
    each setting is a ContextVar). Older torch patches the process-wide value."""
    import contextvars

    import torch._dynamo.config as config

    entry = getattr(config, "_config", {}).get("recompile_limit")
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


@functools.lru_cache(maxsize=1)
def _warn_strict_is_weaker() -> None:
    """Once per process: strict serving on a torch whose dynamo settings are process-wide."""
    logger.warning(
        "strict=True on torch %s: a recompilation of a warmed shape (a dynamo guard failing) is not refused; "
        "torch >= 2.13 keeps dynamo's settings per thread, which strict serving needs", torch.__version__)


@functools.lru_cache(maxsize=1)
def _raise_process_wide_recompile_limit() -> None:
    """Once per process, on a torch whose dynamo settings are process-wide: raise dynamo's
    recompile limit to what torch 2.13 gets per call. Every handle's graphs of a U-Net function
    count against one code object, so dynamo's default of 8 failed the 9th shape of the process
    (a server with 3 sizes and 3 batch sizes; the test suite on torch 2.11). Raising it changes
    other compiled functions of the process too: they may recompile more before dynamo gives up
    on them. A patch around each call would not be safer: two threads' patches interleave."""
    import torch._dynamo

    config = torch._dynamo.config
    limit = max(RECOMPILE_LIMIT, config.accumulated_recompile_limit)
    if config.recompile_limit < limit:
        logger.warning(
            "torch %s keeps dynamo's settings process-wide: fastcache raised torch._dynamo.config.recompile_limit "
            "from %d to %d for the whole process (its U-Net functions hold a graph per shape, for every handle)",
            torch.__version__, config.recompile_limit, limit)
        config.recompile_limit = limit


@contextlib.contextmanager
def dynamo_policy(fail_on_recompile: bool) -> Iterator[None]:
    """Dynamo's settings for one call of a fastcache function, on the calling thread only.

    Dynamo's recompile limit counts a function's graphs across every handle of the process (they
    share the split's code), so it is set to the process-wide ceiling
    (``accumulated_recompile_limit``) and fastcache counts each handle's shapes itself
    (RECOMPILE_LIMIT); hitting either raises, never runs eager. With `fail_on_recompile`,
    any recompilation raises RecompileError (strict serving of a warmed key). These are dynamo
    config values, which torch 2.13 keeps per thread, so nothing leaks to another thread's
    functions, whatever the interleaving. torch's ``set_stance`` is process-wide and is not used.
    On an older torch, whose config patches are process-wide, the recompile limit is raised once
    for the process (`_raise_process_wide_recompile_limit`) and a recompilation of a warmed key is
    not refused.
    """
    if not dynamo_config_is_thread_local():
        _raise_process_wide_recompile_limit()
        if fail_on_recompile:
            _warn_strict_is_weaker()
        yield
        return
    import torch._dynamo

    config = torch._dynamo.config
    limit = max(RECOMPILE_LIMIT, config.accumulated_recompile_limit)
    settings: dict[str, Any] = dict(recompile_limit=limit, fail_on_recompile_limit_hit=True)
    if fail_on_recompile:
        settings["error_on_recompile"] = True
    with config.patch(**settings):
        yield


class CompiledRunner(Runner):
    """The split's functions under torch.compile, no CUDA Graphs (CPU, or cuda_graphs=False)."""

    def __init__(self, compiled: CompiledFunctions) -> None:
        super().__init__()
        self.compiled = compiled
        self.split = compiled.split

    def is_prepared(self, key: Hashable, refresh: bool) -> bool:
        return self.compiled.is_compiled("full" if refresh else "shallow", key)

    @property
    def compilations(self) -> int:
        return self.compiled.count

    def _call(self, which: str, key: Hashable, *args: Any) -> Any:
        return self.compiled.call(which, key, self.may_prepare(key), *args)

    def refresh(self, key: Hashable, inputs: StepInputs) -> Tensor:
        noise, self._kept = self._call("full", key, *without_inference_tensors(inputs.args()))
        return noise

    def cached(self, key: Hashable, inputs: StepInputs) -> Tensor:
        assert self._kept is not None, "the dispatcher refreshes before any cached step"
        return self._call("shallow", key, *without_inference_tensors(inputs.args()), self._kept)

    def tgate_prepared(self, key: Hashable, refresh: bool, actions: tuple[str, str, str]) -> bool:
        return self.compiled.is_compiled("full_tgate" if refresh else "shallow_tgate", key, actions)

    def _tgate_call(self, which: str, key: Hashable, actions: tuple[str, str, str], *args: Any) -> Any:
        return self.compiled.call(which, key, self.may_prepare(key), *without_inference_tensors(args), variant=actions)

    def release(self) -> None:
        self._kept = None
        self._tgate_caches.clear()
