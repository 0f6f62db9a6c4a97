"""FastCacheConfig: every option of `fastcache.accelerate`, in one place."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from .errors import InvalidConfigError
from .schedule import RefreshSchedule, make_schedule


@dataclass(frozen=True)
class FastCacheConfig:
    """Options of `fastcache.accelerate`. Every optimisation can be switched off here."""

    # Steps between refreshes of the cached deep features; 1 turns caching off.
    cache_interval: int = 3
    # DeepCache's skip-branch id: 0 (shallowest, fastest) .. levels * (layers_per_block + 1) - 1.
    cache_branch_id: int = 0
    # "uniform" (every cache_interval steps), "quadratic" (DeepCache's non-uniform schedule, dense
    # around `center`), or an explicit sequence of refresh steps. Step 0 always refreshes.
    schedule: str | Sequence[int] = "uniform"
    # Quadratic schedule only: DeepCache's `center` and `pow`, with its published defaults.
    center: int = 15
    power: float = 1.4
    # torch.compile both graphs (inductor, fullgraph, static shapes). False runs the same split
    # eagerly: the exact reference, and the way to debug.
    compile: bool = True
    # torch.compile backend; "inductor" in production. Tests use "eager"/"aot_eager" to check that
    # dynamo traces every branch without graph breaks at a fraction of inductor's compile time.
    compile_backend: str = "inductor"
    # torch.compile's `mode` (e.g. "max-autotune-no-cudagraphs": autotuned GEMM/conv templates,
    # longer compiles) or inductor `options` (e.g. {"conv_1x1_as_mm": True}); at most one of them,
    # as torch.compile allows. Modes with inductor's own CUDA Graphs ("reduce-overhead",
    # "max-autotune") would capture inside fastcache's graphs and are refused.
    compile_mode: str | None = None
    compile_options: tuple[tuple[str, Any], ...] = ()
    # Also compile the VAE decoder / the text encoder(s) (same backend and settings, one graph per
    # shape, prepared by warmup; not CUDA Graphs). Off until measured on a GPU (bench/NOTES.md).
    compile_vae: bool = False
    compile_text_encoders: bool = False
    # Capture and replay CUDA Graphs. None: on for CUDA devices, off elsewhere.
    cuda_graphs: bool | None = None
    # Debugging and CPU tests: graph replay semantics (static buffers, in-place kept features)
    # without CUDA. With compile=False replays run a recording of the split's ops (tensors read
    # by reference, Python values baked in, as in a CUDA Graph); compiled, the function re-runs.
    emulate_graphs: bool = False
    # Serving: a shape that warmup() did not prepare, or a recompilation, raises instead of
    # compiling on the hot path.
    strict: bool = False
    # ControlNet pipelines: on cached steps, skip the ControlNet and reuse the residuals it gave on
    # the latest refresh step of the same call (when its other inputs and conditioning scale are
    # the same). Off by default because it changes the images: DeepCache, and fastcache without it,
    # feed the shallow skips fresh ControlNet residuals on every step; with it, the control signal
    # is held for `cache_interval` steps. It saves the ControlNet's cost (about a U-Net's down path
    # and mid block) on every cached step.
    controlnet_reuse: bool = False
    # During each pipeline call, the scheduler's timesteps stay on the CPU (what diffusers does on
    # XLA): DDIM/PNDM/Euler-type schedulers then index their tables on the host, where a device
    # timestep costs a GPU sync per step (host_timesteps.py). Same values, same images. Off until
    # measured on a GPU; ControlNet models still copy each step's timestep to the device.
    host_timesteps: bool = False
    # TGATE (arXiv 2404.02747) on top of DeepCache, with the `tgate` package's semantics
    # (TgateSDDeepCacheLoader / TgateSDXLDeepCacheLoader): from step `gate_step` on, classifier-free
    # guidance stops (the U-Net runs the unconditional half only) and every cross-attention output
    # is the one cached at step gate_step - 1 (the mean of its two guided halves). None: off.
    # Self-attention caching: every `sp_interval` steps before the gate (from step `warm_up`), every
    # `fi_interval` steps after it; other steps reuse the latest cached output (1, 1, 0: never).
    gate_step: int | None = None
    sp_interval: int = 1
    fi_interval: int = 1
    warm_up: int = 0

    @classmethod
    def from_options(cls, **options: Any) -> "FastCacheConfig":
        """The config `fastcache.accelerate(pipe, **options)` builds: the dataclass's fields by
        name, with a list of refresh steps and a mapping of inductor options accepted as given."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise InvalidConfigError(
                f"unknown option(s) {unknown}; fastcache.accelerate takes {', '.join(names)} "
                "(FastCacheConfig's fields, docs/options.md)"
            )
        schedule = options.get("schedule")
        if isinstance(schedule, (list, tuple, range)) or type(schedule).__name__ == "ndarray":
            options["schedule"] = tuple(schedule)
        if "compile_options" in options:
            given = options["compile_options"]
            if given is None:
                options["compile_options"] = ()
            elif isinstance(given, Mapping):
                options["compile_options"] = tuple(sorted(given.items()))
            else:
                raise InvalidConfigError(
                    f"compile_options must be a mapping of inductor option names to values, got {given!r}"
                )
        return cls(**options)

    def compile_kwargs(self, device_type: str | None = None) -> dict[str, Any]:
        """torch.compile's keyword arguments for every graph fastcache compiles on `device_type`."""
        from .runtime import compile_kwargs

        return compile_kwargs(self.compile_backend, self.compile_mode, dict(self.compile_options), device_type)

    def refresh_schedule(self) -> RefreshSchedule:
        """The validated schedule (raises InvalidConfigError on bad values)."""
        return make_schedule(self.schedule, self.cache_interval, self.center, self.power)

    def validate(self) -> None:
        """Check everything that does not depend on the U-Net (the branch id is checked there)."""
        self.refresh_schedule()
        for name in ("compile", "emulate_graphs", "strict", "controlnet_reuse", "compile_vae", "compile_text_encoders",
                     "host_timesteps"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.cuda_graphs not in (None, True, False):
            raise InvalidConfigError(f"cuda_graphs must be None (auto), True or False, got {self.cuda_graphs!r}")
        if self.emulate_graphs and self.cuda_graphs:
            raise InvalidConfigError("emulate_graphs and cuda_graphs exclude each other")
        if (self.compile_vae or self.compile_text_encoders) and not self.compile:
            raise InvalidConfigError("compile_vae and compile_text_encoders need compile=True")
        if self.compile_mode is not None and self.compile_options:
            raise InvalidConfigError("give compile_mode or compile_options, not both (torch.compile takes one)")
        if self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise InvalidConfigError(
                f"compile_mode={self.compile_mode!r} turns on inductor's own CUDA Graphs, which fastcache "
                "already captures; use 'default' or 'max-autotune-no-cudagraphs'"
            )
        if self.compile_mode not in (None, "default", "max-autotune-no-cudagraphs"):
            raise InvalidConfigError(
                f"compile_mode must be None, 'default' or 'max-autotune-no-cudagraphs', got {self.compile_mode!r}"
            )
        # Inductor options that capture CUDA Graphs inside fastcache's (compile_kwargs turns them off).
        cudagraphs = sorted(name for name, value in self.compile_options
                            if name in ("triton.cudagraphs", "cudagraph_policy") and value)
        if cudagraphs:
            raise InvalidConfigError(
                f"compile_options {cudagraphs} turn on inductor's own CUDA Graphs, which would capture inside "
                "fastcache's (and keep outputs the next step overwrites); leave them out: fastcache captures "
                "the U-Net's graphs itself, or runs without graphs with cuda_graphs=False"
            )
        if self.compile_options and self.compile_backend == "inductor":
            import torch._inductor.config as inductor_config

            unknown = sorted(name for name, _ in self.compile_options if not hasattr(inductor_config, name))
            if unknown:
                raise InvalidConfigError(
                    f"unknown inductor option(s) {unknown}: compile_options takes names from "
                    "torch._inductor.config (e.g. conv_1x1_as_mm, coordinate_descent_tuning, epilogue_fusion)"
                )
        self._validate_tgate()
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise InvalidConfigError(f"compile_backend must be a torch.compile backend name, got {self.compile_backend!r}")
        known = known_backends()
        if self.compile_backend not in known:
            raise InvalidConfigError(
                f"unknown compile_backend {self.compile_backend!r}: torch.compile knows {', '.join(known)} "
                "(use 'inductor' to serve; register your own with torch._dynamo.register_backend)"
            )

    def _validate_tgate(self) -> None:
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.gate_step is not None and (not is_int(self.gate_step) or self.gate_step < 1):
            raise InvalidConfigError(
                f"gate_step must be None (TGATE off) or an int >= 1 (the step from which guidance and "
                f"cross-attention stop; a gate past the last step changes nothing), got {self.gate_step!r}"
            )
        for name in ("sp_interval", "fi_interval"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise InvalidConfigError(f"{name} must be an int >= 1 (1: self-attention is never reused), got {value!r}")
        if not is_int(self.warm_up) or self.warm_up < 0:
            raise InvalidConfigError(f"warm_up must be an int >= 0 (a step number), got {self.warm_up!r}")
        if self.gate_step is None:
            if (self.sp_interval, self.fi_interval, self.warm_up) != (1, 1, 0):
                raise InvalidConfigError(
                    "sp_interval, fi_interval and warm_up are TGATE options: they need gate_step"
                )
            return
        if self.schedule != "uniform":
            raise InvalidConfigError(
                f"gate_step needs schedule='uniform' (the tgate package runs DeepCache's uniform schedule "
                f"and re-arms it at the gate), got schedule={self.schedule!r}"
            )
        if self.controlnet_reuse:
            raise InvalidConfigError("gate_step supports text-to-image pipelines only; controlnet_reuse is for ControlNet")


def known_backends() -> list[str]:
    """Every backend name torch.compile accepts now, debug and experimental ones included."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))
