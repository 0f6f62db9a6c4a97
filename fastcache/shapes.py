"""Which runner serves each input shape, and what happens to a shape that cannot be prepared.

A handle has one runner (eager, compiled, or CUDA / emulated graphs: runtime.py, graphs.py) and
serves every shape through it, except:

* inputs that the eager split fails on too are the caller's error: `InvalidInputError`, and
  nothing changes;
* a new shape past `runtime.RECOMPILE_LIMIT` runs on the eager split from then on (the same
  computation, uncompiled), with a warning; `warmup()` at such a shape raises `ShapeLimitError`;
* a compile or capture failure of a valid input raises `CompileError`. If the handle never served
  a shape, nothing works (the backend or a setting), so the handle is told to restore the
  pipeline first (`on_first_failure`); otherwise only this shape is refused, now and on later
  calls (no recompiling on every request), until `warmup()` retries it or the model changes, and
  the prepared shapes keep their graphs.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable

import torch
from torch import Tensor

from .config import FastCacheConfig
from .errors import CompileError, FastCacheError, InvalidConfigError, InvalidInputError, ShapeLimitError
from .graphs import GraphRunner
from .runtime import CompiledFunctions, CompiledRunner, EagerRunner, MemoryReport, Runner, Split, describe_key
from .unet_call import StepInputs

logger = logging.getLogger("fastcache")

# What makes a handle's runner: `make_runner` by default; `FastCache(pipe, config, runner_factory=...)`
# takes another (bench/host_overhead.py measures fastcache's own host time with one that does no work).
RunnerFactory = Callable[[Split, FastCacheConfig, torch.device], Runner]


def make_runner(split: Split, config: FastCacheConfig, device: torch.device) -> Runner:
    """The runner `config` asks for on `device`. Strict mode is decided here, once: a runner that
    may not prepare new shapes refuses unwarmed shapes and recompiles (warmup() lifts it)."""
    use_graphs = config.cuda_graphs if config.cuda_graphs is not None else device.type == "cuda"
    if use_graphs and device.type != "cuda":
        raise InvalidConfigError(f"cuda_graphs=True needs the U-Net on a CUDA device; it is on {device}")
    compiled = CompiledFunctions(split, config.compile_kwargs(device.type)) if config.compile else None
    runner: Runner
    if use_graphs or config.emulate_graphs:
        runner = GraphRunner(split, compiled, emulate=not use_graphs)
    elif compiled is not None:
        runner = CompiledRunner(compiled)
    else:
        runner = EagerRunner(split)
    runner.allow_new_shapes = not config.strict
    return runner


def runtime_name(runner: Runner) -> str:
    """What runs the U-Net: "eager", "compiled", "cuda-graphs" or "emulated-graphs"."""
    if isinstance(runner, GraphRunner):
        return "emulated-graphs" if runner.emulate else "cuda-graphs"
    return "compiled" if isinstance(runner, CompiledRunner) else "eager"


class ShapeRunner:
    """The handle's runner plus the eager fallback, and the shapes each has served."""

    def __init__(self, runner: Runner, split: Split, on_first_failure: Callable[[], None]) -> None:
        self.runner = runner
        self.split = split
        self.seen: set[Hashable] = set()  # served (a shape refused in strict mode is not "seen")
        self._fallback = EagerRunner(split)
        self._eager_keys: set[Hashable] = set()
        self._tgate_runner: Runner | None = None  # the runner of the latest TGATE step
        self._failed: dict[Hashable, str] = {}  # the message of each shape's failure
        self._compilations_before = 0
        self._on_first_failure = on_first_failure
        self.warming = False  # warmup() under way: prepares shapes that failed or are past the limit

    @property
    def compilations(self) -> int:
        return self._compilations_before + self.runner.compilations

    @property
    def eager_shapes(self) -> tuple[str, ...]:
        return tuple(sorted(describe_key(key) for key in self._eager_keys))

    def memory(self) -> MemoryReport:
        return self.runner.memory()

    def replace(self, runner: Runner, split: Split) -> None:
        """A new runner after a model change: shapes already served may be prepared again, even in
        strict mode (the user changed the model, so that compilation is expected)."""
        old = self.runner
        old.release()
        self._compilations_before += old.compilations
        runner.allow_new_shapes = old.allow_new_shapes  # warmup() may be under way
        runner.rewarm_keys = frozenset(self.seen)
        self.runner, self.split = runner, split
        self._fallback.release()
        self._fallback = EagerRunner(split)  # the split may be a new U-Net's
        self._eager_keys.clear()  # the new runner has room for them, and failures may not recur
        self._tgate_runner = None
        self._failed.clear()

    def release(self) -> None:
        self.runner.release()
        self._fallback.release()

    def run(self, refresh: bool, key: Hashable, inputs: StepInputs, actions: tuple[str, str, str] | None = None) -> Tensor:
        """One U-Net call at `key`: the full (refresh) or shallow function; see the module doc.
        `actions`: a TGATE step's attention actions (tgate.py), run by the TGATE functions."""
        noise = self._run(refresh, key, inputs, actions)
        self.seen.add(key)
        return noise

    def _call(self, runner: Runner, refresh: bool, key: Hashable, inputs: StepInputs,
              actions: tuple[str, str, str] | None) -> Tensor:
        if actions is not None:
            if self._tgate_runner is not None and self._tgate_runner is not runner:
                runner.adopt_tgate_caches(self._tgate_runner.tgate_caches())  # stored on the other runner
            self._tgate_runner = runner
            return runner.run_tgate(refresh, key, inputs, actions)
        return runner.refresh(key, inputs) if refresh else runner.cached(key, inputs)

    def _run(self, refresh: bool, key: Hashable, inputs: StepInputs, actions: tuple[str, str, str] | None = None) -> Tensor:
        if key in self._eager_keys:
            if self.warming:
                raise ShapeLimitError(
                    f"{describe_key(key)} runs on the eager split: this handle's graphs were full when it "
                    "was first served (fastcache.runtime.RECOMPILE_LIMIT graphs per U-Net function), so "
                    "warmup() cannot prepare graphs for it; the prepared shapes keep theirs"
                )
            return self._call(self._fallback, refresh, key, inputs, actions)
        runner = self.runner
        prepared = runner.is_prepared(key, refresh) if actions is None else runner.tgate_prepared(key, refresh, actions)
        if prepared:
            return self._call(runner, refresh, key, inputs, actions)
        if key in self._failed and not self.warming:
            raise CompileError(
                f"fastcache could not prepare the U-Net graphs for {describe_key(key)} earlier "
                f"({self._failed[key]}), so this shape is refused without trying again; the handle keeps "
                "serving the shapes it prepared. warmup() at this shape tries again."
            )
        try:
            noise = self._call(runner, refresh, key, inputs, actions)
        except ShapeLimitError as error:
            if self.warming or not refresh:
                raise ShapeLimitError(
                    f"{error}. The prepared shapes keep their graphs; serving calls at this shape "
                    "(strict=False) run it on the eager split. Raise fastcache.runtime.RECOMPILE_LIMIT "
                    "before accelerate to hold more shapes."
                ) from error
            return self._run_past_limit(key, inputs, error, actions)
        except FastCacheError:  # ShapeNotWarmedError, and errors that say what to do already
            raise
        except Exception as error:
            raise self._preparation_failed(refresh, key, inputs, error) from error
        self._failed.pop(key, None)
        return noise

    def _run_past_limit(self, key: Hashable, inputs: StepInputs, error: ShapeLimitError,
                        actions: tuple[str, str, str] | None = None) -> Tensor:
        """A new shape past RECOMPILE_LIMIT, while serving: its own eager split, warned once."""
        self._eager_keys.add(key)
        logger.warning(
            "%s: it runs on the eager split (the same computation, uncompiled and without graphs) "
            "from now on, and the prepared shapes keep theirs. Warm up the shapes you serve, or raise "
            "fastcache.runtime.RECOMPILE_LIMIT before accelerate.", error,
        )
        return self._call(self._fallback, True, key, inputs, actions)

    def _preparation_failed(self, refresh: bool, key: Hashable, inputs: StepInputs, error: Exception) -> FastCacheError:
        """The error to raise for a failure while preparing `key`."""
        eager_error = error if isinstance(self.runner, EagerRunner) else self._eager_failure(inputs)
        if eager_error is not None:
            return InvalidInputError(
                f"this U-Net call's inputs fail in the plain (eager) U-Net too, so they are the "
                f"caller's error: {type(eager_error).__name__}: {eager_error}. Shapes: "
                f"{describe_key(key)}. fastcache changed nothing and stays enabled."
            )
        summary = f"{type(error).__name__}: {error}"
        which = "full" if refresh else "shallow"
        if not self.seen:
            self._on_first_failure()
            return CompileError(
                f"fastcache could not prepare the {which} U-Net graph for {describe_key(key)}: {summary}\n"
                "It had not served any shape, so the pipeline was restored to its original state. To "
                "narrow it down, accelerate with cuda_graphs=False, then compile=False."
            )
        self._failed[key] = summary
        return CompileError(
            f"fastcache could not prepare the {which} U-Net graph for {describe_key(key)}: {summary}\n"
            "Only this shape is refused (now and on later calls, until warmup() at this shape tries "
            "again or the model changes); the handle stays enabled and keeps its prepared shapes."
        )

    def _eager_failure(self, inputs: StepInputs) -> Exception | None:
        """What the eager split raises on `inputs`, or None: tells a bad input from a compile or
        capture failure (only on that failure path; it costs one uncompiled U-Net run)."""
        try:
            self.split.full(*inputs.args())
        except Exception as error:  # noqa: BLE001 (returned: the caller's input error)
            return error
        return None
