"""The methods the benchmark compares, each with enable/disable that leave the pipeline as built.

* ``eager``: the plain diffusers pipeline, attention through SDPA (diffusers' default processor).
* ``deepcache``: the DeepCache 0.1.1 package's ``DeepCacheSDHelper`` (eager module wrapping).
* ``tgate``: the tgate 1.0.0 package's DeepCache loaders (TGATE on DeepCache, eager module
  patching): the reference of a config with a gate (``I3B0G10``), in place of ``deepcache``.
* ``compile``: the plain pipeline with ``pipe.unet.forward`` under ``torch.compile`` (no caching).
* ``fastcache``: ``fastcache.accelerate`` (compiled graphs; CUDA Graphs on CUDA by default).

Each method also says, after a direct ``pipe.unet(...)`` call, whether that call ran the whole
U-Net ("full"/"refresh") or only the shallow branch ("cached"), read from the method's own state,
so step times are classified by what actually ran, not by what the schedule should have done.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

FULL, REFRESH, CACHED = "full", "refresh", "cached"


@dataclass(frozen=True)
class CacheConfig:
    """A DeepCache setting written ``I{cache_interval}B{cache_branch_id}`` (e.g. I3B0), with
    ``G{gate_step}`` for TGATE on top (e.g. I3B0G10)."""

    interval: int
    branch: int
    gate: int | None = None

    @property
    def label(self) -> str:
        return f"I{self.interval}B{self.branch}" + (f"G{self.gate}" if self.gate is not None else "")

    @property
    def reference(self) -> str:
        """The package method this config's fastcache is compared with: tgate with a gate."""
        return "deepcache" if self.gate is None else "tgate"

    @classmethod
    def parse(cls, text: str) -> "CacheConfig":
        match = re.fullmatch(r"[Ii](\d+)[Bb](\d+)(?:[Gg](\d+))?", text.strip())
        if not match or int(match.group(1)) < 1 or (match.group(3) is not None and int(match.group(3)) < 1):
            raise ValueError(
                f"config {text!r} is not I<interval>B<branch>[G<gate>] with interval >= 1 and gate >= 1 "
                "(e.g. I3B0, I3B0G10)"
            )
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)) if match.group(3) else None)


def reference_kind(label: str) -> str:
    """`CacheConfig.reference` from a config label (the results keep labels)."""
    return CacheConfig.parse(label).reference


@dataclass(frozen=True)
class Shape:
    """One benchmarked image size and batch (images per prompt)."""

    width: int
    height: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height} b{self.batch}"


@dataclass(frozen=True)
class CompileSettings:
    """How the ``compile`` and ``fastcache`` methods compile (the smoke test uses backend "eager")."""

    backend: str = "inductor"
    mode: str | None = None  # torch.compile mode of the ``compile`` method (None: default)
    cuda_graphs: bool | None = None  # fastcache's option; None: on for CUDA
    # More fastcache.accelerate keywords for the ``fastcache`` method (--fastcache-option), e.g.
    # (("compile_vae", True), ("compile_mode", "max-autotune-no-cudagraphs")).
    fastcache_options: tuple[tuple[str, Any], ...] = ()


def _dynamo_reset() -> None:
    """Drop dynamo's in-memory cache entries (they hold references to the disabled method's graphs)."""
    import torch._dynamo

    torch._dynamo.reset()


def _drop_instance_forwards(module: torch.nn.Module) -> None:
    """Delete ``forward`` instance attributes that only re-bind the class's own forward.

    DeepCache's ``disable()`` assigns the saved bound methods back as instance attributes; the
    behaviour is the original, but the modules are not as built (and each holds a reference cycle).
    """
    for sub in module.modules():
        bound = vars(sub).get("forward")
        if bound is not None and getattr(bound, "__func__", None) is type(sub).forward and bound.__self__ is sub:
            del sub.forward


def is_restored(pipe: Any, pipeline_class: type) -> bool:
    """The pipeline has its original class and no module carries a patched forward."""
    return type(pipe) is pipeline_class and all("forward" not in vars(m) for m in pipe.unet.modules())


class Method:
    """A way to run the pipeline: ``enable`` before the measurements, ``disable`` after."""

    kind = "method"

    def __init__(self, config: CacheConfig | None = None) -> None:
        self.config = config

    @property
    def label(self) -> str:
        return self.kind if self.config is None else f"{self.kind} {self.config.label}"

    def enable(self, pipe: Any, shape: Shape, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Install the method (and warm it up where that is a separate step). Returns details."""
        self.pipe = pipe
        return {}

    def disable(self) -> None:
        """Undo `enable` completely."""

    def begin_direct_calls(self) -> None:
        """Before a series of direct ``pipe.unet(...)`` calls: start as a denoising loop would."""

    def last_call_kind(self) -> str:
        """What the latest direct U-Net call ran: FULL (no caching), REFRESH or CACHED."""
        return FULL

    def refresh_pattern(self) -> list[bool] | None:
        """Refresh (True) or cached (False) per U-Net call of the latest pipeline call, where known."""
        return None

    def call_labels(self) -> list[str] | None:
        """What each U-Net call of the latest pipeline call ran (e.g. "refresh b2"), where known."""
        return None

    def memory_details(self) -> dict[str, Any]:
        """Memory the method says it holds itself, for the results' details (while enabled)."""
        return {}


class Eager(Method):
    kind = "eager"

    def enable(self, pipe: Any, shape: Shape, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        super().enable(pipe, shape, call_kwargs)
        processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
        return {"attention_processors": processors}


class DeepCache(Method):
    kind = "deepcache"

    def enable(self, pipe: Any, shape: Shape, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        from DeepCache import DeepCacheSDHelper

        super().enable(pipe, shape, call_kwargs)
        assert self.config is not None
        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.helper.set_params(cache_interval=self.config.interval, cache_branch_id=self.config.branch)
        self.helper.enable()
        return {}

    def disable(self) -> None:
        self.helper.disable()
        _drop_instance_forwards(self.pipe.unet)

    def begin_direct_calls(self) -> None:
        # DeepCache counts steps from the first timestep it ever saw after enable(); the pipeline
        # calls before already set it to the first timestep, where direct calls start too.
        pass

    def last_call_kind(self) -> str:
        """DeepCache's own rule (uniform mode): refresh when (step - start) % interval == 0."""
        helper = self.helper
        step = helper.cur_timestep - helper.start_timestep
        return REFRESH if step % helper.params["cache_interval"] == 0 else CACHED


class Tgate(Method):
    """The tgate package's ``TgateSDDeepCacheLoader`` / ``TgateSDXLDeepCacheLoader``: the pipeline's
    calls go through the ``pipe.tgate(...)`` it adds, with the config's gate (its self-attention
    options at their defaults, which never reuse a stale cache across calls)."""

    kind = "tgate"

    def enable(self, pipe: Any, shape: Shape, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        from tgate import TgateSDDeepCacheLoader, TgateSDXLDeepCacheLoader

        super().enable(pipe, shape, call_kwargs)
        assert self.config is not None and self.config.gate is not None
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        (TgateSDXLDeepCacheLoader if sdxl else TgateSDDeepCacheLoader)(
            pipe, cache_interval=self.config.interval, cache_branch_id=self.config.branch)
        self.original_class = original = type(pipe)
        gate = self.config.gate

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self.tgate(*args, gate_step=gate, **kwargs)

        pipe.__class__ = type(original.__name__, (original,), {"__call__": call})
        return {"gate_step": gate}

    def disable(self) -> None:
        pipe = self.pipe
        pipe.__class__ = self.original_class
        pipe.deepcache.disable()
        for name in ("tgate", "deepcache"):
            delattr(pipe, name)
        for module in pipe.unet.modules():  # the package's attention forwards and their caches
            if type(module).__name__ == "Attention":
                vars(module).pop("forward", None)
                vars(module).pop("cache", None)
        _drop_instance_forwards(pipe.unet)


class Compile(Method):
    kind = "compile"

    def __init__(self, settings: CompileSettings) -> None:
        super().__init__(None)
        self.settings = settings

    def enable(self, pipe: Any, shape: Shape, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Compiles lazily: the first pipeline call (timed as time to first image) compiles."""
        super().enable(pipe, shape, call_kwargs)
        options: dict[str, Any] = dict(backend=self.settings.backend, fullgraph=True, dynamic=False)
        if self.settings.mode is not None:
            options["mode"] = self.settings.mode
        pipe.unet.forward = torch.compile(pipe.unet.forward, **options)
        return {"torch_compile": {k: v for k, v in options.items()}}

    def disable(self) -> None:
        del self.pipe.unet.forward
        _dynamo_reset()


class FastCache(Method):
    kind = "fastcache"

    def __init__(self, config: CacheConfig, settings: CompileSettings, variant: str = "") -> None:
        """`variant`: what sets this one apart from other fastcache methods of a run (its label's end)."""
        super().__init__(config)
        self.settings = settings
        self.variant = variant

    @property
    def label(self) -> str:
        return super().label + (f" [{self.variant}]" if self.variant else "")

    def enable(self, pipe: Any, shape: Shape, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """accelerate + warmup for this shape, with the same call arguments as the timed calls."""
        import fastcache

        super().enable(pipe, shape, call_kwargs)
        assert self.config is not None
        gate = {} if self.config.gate is None else {"gate_step": self.config.gate}
        self.handle = fastcache.accelerate(
            pipe, cache_interval=self.config.interval, cache_branch_id=self.config.branch, **gate,
            compile=True, compile_backend=self.settings.backend, cuda_graphs=self.settings.cuda_graphs,
            **dict(self.settings.fastcache_options),
        )
        try:
            report = self.handle.warmup(
                height=shape.height, width=shape.width, batch_size=shape.batch, **call_kwargs
            )
        except BaseException:
            self.handle.disable()
            raise
        return {
            "warmup": {"seconds": report.seconds, "compilations": report.compilations,
                       "new_shapes": list(report.new_shapes)},
            "cuda_graphs": self.handle.runtime == "cuda-graphs",
            "runtime": self.handle.runtime,
        }

    def disable(self) -> None:
        self.handle.disable()
        _dynamo_reset()

    def begin_direct_calls(self) -> None:
        self.handle.reset()
        self._counts = (self.handle.stats.refresh_steps, self.handle.stats.cached_steps)

    def refresh_pattern(self) -> list[bool] | None:
        return list(self.handle.stats.last_call)

    def call_labels(self) -> list[str] | None:
        stats = self.handle.stats
        return [f"{'refresh' if refresh else 'cached'} b{rows}" for refresh, rows in zip(stats.last_call, stats.last_call_rows)]

    def memory_details(self) -> dict[str, Any]:
        """``handle.memory()``: static buffers, kept features, and on CUDA the graph pool (bytes)."""
        report = self.handle.memory()
        return {"fastcache_memory": dict(dataclasses.asdict(report), total=report.total)}

    def last_call_kind(self) -> str:
        """Classified by which of fastcache's counters moved during the call."""
        counts = (self.handle.stats.refresh_steps, self.handle.stats.cached_steps)
        moved = (counts[0] - self._counts[0], counts[1] - self._counts[1])
        self._counts = counts
        if moved == (1, 0):
            return REFRESH
        if moved == (0, 1):
            return CACHED
        raise RuntimeError(f"one U-Net call moved fastcache's counters by {moved}")


def build_methods(configs: list[CacheConfig], settings: CompileSettings) -> list[Method]:
    """The order the benchmark runs them in: eager first (the reference), then compile, then
    DeepCache (tgate for a config with a gate) and fastcache at each config, one after the other."""
    methods: list[Method] = [Eager(), Compile(settings)]
    for config in configs:
        methods += [Tgate(config) if config.gate is not None else DeepCache(config), FastCache(config, settings)]
    return methods
