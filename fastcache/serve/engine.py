"""The engine: one pipeline, its accelerator, and the one worker thread that calls it.

It knows nothing of HTTP (the app maps its exceptions to status codes). Request handlers call
`submit` (validates, queues, returns at once) and wait on the job's future; the worker thread
loads and warms the pipeline, then takes batches from the `Batcher` and runs each as one pipeline
call, so the event loop never waits on the pipeline and the pipeline never sees two threads.

Seeds: image ``i`` of a request gets its own ``torch.Generator("cpu").manual_seed(seed + i)``, so
its initial latents are the same whether it runs alone or batched with other requests (diffusers
draws each image's latents from its own generator when given a list). What can still differ is
the arithmetic of batch-size-dependent kernels; the tests bound it.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from .accelerators import ACCELERATORS, Accelerator
from .batcher import Batcher, Job, JobDropped, QueueClosed, QueueFull, settle
from .config import ServeConfig, size_label
from .metrics import ServeMetrics

logger = logging.getLogger("fastcache.serve")

SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # WIDTHxHEIGHT
MAX_SEED = 2**53 - 1  # exact in every JSON client (JavaScript numbers included)

__all__ = ["Engine", "GenerationParams", "GeneratedImage", "JobResult", "RequestRejected", "NotReady", "PipelineFailed",
           "CallStopped", "JobDropped", "QueueFull"]


class RequestRejected(ValueError):
    """A request this server cannot run as asked (`param` names the field)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class NotReady(RuntimeError):
    """The engine does not take requests now: warming up, draining, stopped or failed."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


class PipelineFailed(RuntimeError):
    """The pipeline call this request was part of raised."""


class CallStopped(RuntimeError):
    """The server stopped this request's pipeline call before its end (`Engine.abort`)."""


@dataclass(frozen=True)
class GenerationParams:
    """One request, as the engine sees it (None: the server's default)."""

    prompt: str
    n: int = 1
    size: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    model: str | None = None


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys can share one pipeline call."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    negative: bool  # negative prompts given (diffusers encodes "" vs None differently for SDXL)


@dataclass(frozen=True)
class Work:
    prompt: str
    negative_prompt: str | None
    seed: int


@dataclass(frozen=True)
class GeneratedImage:
    png_base64: str
    seed: int


@dataclass(frozen=True)
class JobResult:
    """A request's images and the pipeline call that made them (the call is numbered from 1 after
    warm-up; `images` of the call's `batch_size` were requested, the rest padding)."""

    images: list[GeneratedImage]
    call: int
    call_images: int
    batch_size: int


def _torch_dtype(name: str, device: Any) -> Any:
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_pipeline(config: ServeConfig) -> Any:
    """The tiny embedded pipeline, or ``--model``'s folder through diffusers' AutoPipeline."""
    import torch

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _torch_dtype(config.dtype, device)
    if config.model is None:
        from fastcache.tiny import tiny_sd_pipeline

        return tiny_sd_pipeline(seed=0, device=device, dtype=dtype)
    if not os.path.isdir(config.model):
        raise FileNotFoundError(f"--model {config.model}: no such folder (a local diffusers pipeline folder, as "
                                "save_pretrained writes it; the server never downloads)")
    from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = AutoPipelineForText2Image.from_pretrained(config.model, torch_dtype=dtype, local_files_only=True)
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ValueError(f"{config.model} holds a {type(pipe).__name__}; the server serves SD 1.x/2.x and SDXL "
                         "text-to-image pipelines")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless at any level; 1 is the fastest
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Engine:
    """See the module docstring. Lifecycle: `start()` -> ready -> `begin_drain()` -> `stop()`."""

    def __init__(self, config: ServeConfig, metrics: ServeMetrics | None = None) -> None:
        config.validate()
        self.config = config
        self.metrics = metrics or ServeMetrics()
        self.model_id = config.model_name or (
            os.path.basename(os.path.normpath(config.model)) if config.model else "fastcache-tiny-sd")
        self.created = int(time.time())
        self.state = "created"  # created, loading, warming, ready, draining, stopped, failed
        self.failure: str | None = None
        self.sizes: tuple[tuple[int, int], ...] = config.sizes or ()  # known after loading without --sizes
        self.warmed: list[tuple[int, int, int]] = []
        self.pipe: Any = None
        self.accelerator: Accelerator | None = None
        self._guidance_free = False  # the U-Net embeds guidance (LCM-style): no CFG batch doubling
        self.max_steps = config.max_steps  # lowered at load where the scheduler runs fewer
        self._ready = threading.Event()
        self._steps_seen: tuple[int, int] | None = None
        self._call_seconds = 1.0  # running mean of pipeline calls, for Retry-After
        self._calls = 0
        self._aborting = False  # `abort`: the running call stops at its next step
        self._call_started: float | None = None  # time.monotonic() of the running call's start
        self._thread: threading.Thread | None = None
        self.batcher = Batcher(
            config.max_queue, config.images_per_call, config.max_batch_delay_ms / 1000.0, combine=config.batching,
            on_drop=lambda job, reason: self.metrics.dropped.labels(reason).inc(),
            on_depth=self.metrics.queue_depth.set,
        )
        self.metrics.info.info({
            "model": self.model_id, "accelerator": config.accelerator, "batching": str(config.batching).lower(),
            "cache_interval": str(config.cache_interval), "cache_branch_id": str(config.cache_branch_id),
            "batch_sizes": ",".join(map(str, config.batch_sizes)), "compile_backend": config.compile_backend,
        })

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Load and warm on the worker thread (returns at once; `wait_ready` or `state` tell)."""
        if self._thread is not None:
            return
        self.state = "loading"
        self._thread = threading.Thread(target=self._main, name="fastcache-worker", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until ready (True) or failed / timed out (False)."""
        self._ready.wait(timeout)
        return self.state in ("ready", "draining")

    def begin_drain(self) -> None:
        """Stop taking requests (NotReady) but finish the queued and running ones."""
        if self.state in ("ready", "loading", "warming", "created"):
            self.state = "draining"
            self.metrics.ready.set(0)
            self.batcher.flush()  # no request will come to share a call with the queued ones
            logger.info("draining: %d requests queued", self.batcher.depth)

    def abort(self) -> None:
        """Stop now, not after the queue: queued requests are dropped (503) and the running call stops
        at its next step, its requests answered 503 too (their images would be unfinished)."""
        self.begin_drain()
        self._aborting = True
        self.batcher.close(reason="shutdown")
        logger.info("stopping now: queued requests dropped, the running call stops at its next step")

    def health_problem(self, now: float | None = None) -> str | None:
        """Why this engine cannot serve until its process restarts, or None. Besides a failure: a
        pipeline call running past twice --request-timeout, when every request of it timed out long
        ago and it should have stopped at its next step (a hung kernel or driver)."""
        if self.state == "failed":
            return self.failure or "the engine failed"
        started = self._call_started
        if started is not None:
            running = (time.monotonic() if now is None else now) - started
            if running > 2 * self.config.request_timeout:
                return (f"the pipeline call has run {running:.0f} s, past twice --request-timeout "
                        f"({self.config.request_timeout:g} s): the worker looks stuck")
        return None

    def idle(self) -> bool:
        """Nothing queued or running."""
        return self.batcher.idle()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Drop what is still queued, let the running call finish, end the worker, restore the pipeline."""
        self.begin_drain()
        self.batcher.close(reason="shutdown")
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped" if self.failure is None else "failed"

    # -- requests -------------------------------------------------------------------------------
    def submit(self, params: GenerationParams) -> Job:
        """Validate and queue one request; the job's future gets a JobResult.

        Raises RequestRejected (the request is wrong for this server), NotReady, or QueueFull.
        """
        if self.state != "ready":
            raise NotReady(self._not_ready_message(), self.state)
        key, work = self.resolve(params)
        now = time.monotonic()
        job = Job(key=key, images=len(work), deadline=now + self.config.request_timeout,
                  payload=work, arrival=now)
        try:
            self.batcher.submit(job)
        except QueueClosed:
            raise NotReady("the server is shutting down", "draining") from None
        return job

    def cancel(self, job: Job, reason: str) -> bool:
        """The request's client gave up (`reason`: timeout, disconnected). True when the job never
        ran (dropped now, or by the worker at its deadline); else its call runs on and the result
        is discarded (and the call is interrupted at its next step if no request of it is still
        wanted)."""
        dropped = self.batcher.cancel(job, reason)
        if not dropped:
            self.metrics.discarded.inc()
        return dropped

    def resolve(self, params: GenerationParams) -> tuple[BatchKey, list[Work]]:
        """The batch key and per-image work of a request, or RequestRejected saying what is wrong."""
        config = self.config
        if params.model is not None and params.model != self.model_id:
            raise RequestRejected(f"model {params.model!r} is not served here; this server serves {self.model_id!r}",
                                  "model", "model_not_found")
        served = ", ".join(size_label(size) for size in self.sizes)
        if params.size in (None, "auto"):
            width, height = self.sizes[0]
        else:
            parsed = SIZE.fullmatch(params.size)
            width, height = (int(parsed[1]), int(parsed[2])) if parsed else (0, 0)
            if (width, height) not in self.sizes:
                what = "is not served" if parsed else "is not WIDTHxHEIGHT"
                raise RequestRejected(f"size {params.size!r} {what}; this server warmed: {served} ('auto': "
                                      f"{size_label(self.sizes[0])})", "size")
        if not 1 <= params.n <= config.largest_batch:
            raise RequestRejected(f"n must be between 1 and {config.largest_batch} (the largest batch size this "
                                  f"server warmed), got {params.n}", "n")
        steps = config.default_steps if params.num_inference_steps is None else params.num_inference_steps
        if not 1 <= steps <= self.max_steps:
            raise RequestRejected(f"num_inference_steps must be between 1 and {self.max_steps}, got {steps}",
                                  "num_inference_steps")
        guidance = config.default_guidance_scale if params.guidance_scale is None else float(params.guidance_scale)
        if not math.isfinite(guidance) or guidance > 100.0 or (guidance <= 1.0 and not self._guidance_free):
            why = (": this server warmed classifier-free guidance, and guidance_scale <= 1 would run an unwarmed "
                   "shape") if math.isfinite(guidance) and guidance <= 1.0 else ""
            raise RequestRejected(f"guidance_scale must be a finite number in (1, 100], got {guidance}{why}",
                                  "guidance_scale")
        if params.seed is not None and not 0 <= params.seed <= MAX_SEED - (params.n - 1):
            raise RequestRejected(f"seed must be between 0 and {MAX_SEED - (params.n - 1)} (2**53 - n: image i uses "
                                  f"seed + i, and every seed returned must be exact in JSON), got {params.seed}", "seed")
        seed = secrets.randbelow(2**31) if params.seed is None else params.seed
        key = BatchKey(width, height, steps, guidance, params.negative_prompt is not None)
        return key, [Work(params.prompt, params.negative_prompt, seed + i) for i in range(params.n)]

    def retry_after(self) -> int:
        """Seconds until what is queued now has run, about (the running call and the queued images in
        full calls, at the mean call time): a client retrying then finds the queue no fuller than it
        left it, where retrying as soon as one slot frees would meet every other refused client."""
        calls_ahead = 1 + math.ceil(self.batcher.queued_images / max(1, self.config.images_per_call))
        return max(1, math.ceil(calls_ahead * self._call_seconds))

    def status(self) -> dict[str, Any]:
        """What /ready reports."""
        shapes = [(w, h, b) for (w, h) in self.sizes for b in self.config.batch_sizes]
        return {
            "status": self.state, "model": self.model_id, "accelerator": self.config.accelerator,
            "warmed": [f"{size_label((w, h))} batch {b}" for (w, h, b) in self.warmed],
            "pending": [f"{size_label((w, h))} batch {b}" for (w, h, b) in shapes if (w, h, b) not in self.warmed],
            "failure": self.failure,
        }

    def _not_ready_message(self) -> str:
        if self.state in ("loading", "warming", "created"):
            total = len(self.sizes) * len(self.config.batch_sizes)
            return f"the server is warming up ({len(self.warmed)} of {total or '?'} shapes warmed)"
        if self.state == "failed":
            return f"the server cannot serve: {self.failure}"
        return "the server is shutting down"

    # -- the worker thread ----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._load_and_warm()
        except BaseException as error:  # noqa: BLE001 - reported through state, /ready and the log
            logger.exception("loading or warming the pipeline failed")
            self._fail(f"{type(error).__name__}: {error}")
            self._ready.set()
            return
        if self.state == "warming":  # not draining or stopped meanwhile
            self.state = "ready"
            self.metrics.ready.set(1)
        self._ready.set()
        try:
            while (batch := self.batcher.next_batch()) is not None:
                if batch:
                    self._run(batch)
        except BaseException as error:  # a bug outside the pipeline call: stop serving loudly, not hang
            self._fail(f"the worker thread stopped: {type(error).__name__}: {error}")
            logger.exception("the worker thread stopped")
            raise
        finally:
            if self.accelerator is not None:
                self.accelerator.close()

    def _load_and_warm(self) -> None:
        import torch

        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        started = time.perf_counter()
        self.pipe = pipe = load_pipeline(config)
        if not self.sizes:
            native = pipe.unet.config.sample_size * pipe.vae_scale_factor
            self.sizes = ((native, native),)
        self._guidance_free = pipe.unet.config.time_cond_proj_dim is not None
        # A scheduler offsetting its timesteps (DDIM's steps_offset) indexes past its table at
        # num_train_timesteps steps: the most it can run is below --max-steps there.
        scheduler = pipe.scheduler.config
        usable = scheduler.get("num_train_timesteps", config.max_steps) - scheduler.get("steps_offset", 0)
        if usable < config.max_steps:
            logger.warning("--max-steps %d: this pipeline's scheduler runs at most %d steps; requests get that limit",
                           config.max_steps, usable)
            self.max_steps = usable
        cache_file_found = self._load_compile_cache()
        self.accelerator = ACCELERATORS[config.accelerator](pipe, config)
        if self.state == "loading":  # not draining or stopping already
            self.state = "warming"
        for width, height in self.sizes:
            for batch_size in sorted(set(config.batch_sizes)):
                if self.state != "warming":
                    return
                self.accelerator.warm(width, height, batch_size, config.default_guidance_scale)
                self.warmed.append((width, height, batch_size))
                self.metrics.warmed_shapes.set(len(self.warmed))
        self.accelerator.warmed()
        self.metrics.watch_compilations(self.accelerator.compilations_since_warmup)
        self._steps_seen = self.accelerator.step_counts()
        if not cache_file_found:
            self._save_compile_cache()
        self.metrics.warmup_seconds.set(time.perf_counter() - started)
        logger.info("ready: %s with %s, sizes %s, batch sizes %s, warmed in %.1f s", self.model_id,
                    config.accelerator, [size_label(s) for s in self.sizes], list(config.batch_sizes),
                    time.perf_counter() - started)

    def _load_compile_cache(self) -> bool:
        """Load --compile-cache before warm-up; True when the file exists (loaded or not: it is kept)."""
        path = self.config.compile_cache
        if path is None or self.config.accelerator != "fastcache" or not os.path.exists(path):
            return False
        import fastcache

        report = fastcache.load_compile_cache(path)  # never raises; says why when unusable
        if report:
            logger.info("compile cache %s loaded: %s", path, report.artifacts)
            self.metrics.compile_cache_loaded.set(1)
            return True
        logger.warning("compile cache %s not used: %s (it is left as it is)", path, report.reason)
        return True  # a file is there: never overwrite it, even when it did not fit

    def _save_compile_cache(self) -> None:
        path = self.config.compile_cache
        if path is None or self.config.accelerator != "fastcache":
            return
        import fastcache

        try:
            saved = fastcache.save_compile_cache(path)
        except fastcache.CompileCacheError as error:
            logger.warning("compile cache not written: %s", error)
            return
        self.metrics.compile_cache_saved.set(1)
        logger.info("compile cache written to %s (%.1f MB)", path, saved.size_bytes / 1e6)

    def _padded(self, images: int) -> int:
        return min(size for size in self.config.batch_sizes if size >= images)

    def _run(self, batch: list[Job]) -> None:
        """One pipeline call for `batch`, padded to a warmed batch size; settles every job."""
        import torch

        key: BatchKey = batch[0].key
        work = [item for job in batch for item in job.payload]
        target = self._padded(len(work))
        padding = [Work("", "" if key.negative else None, 0)] * (target - len(work))
        calls = work + padding
        self._calls += 1
        self.metrics.running.set(len(batch))
        self.metrics.batch_images.observe(len(work))
        self.metrics.batch_requests.observe(len(batch))
        self.metrics.calls.labels(str(target)).inc()
        self.metrics.padding.inc(len(padding))
        fault = self.config.fault_prompt is not None and any(item.prompt == self.config.fault_prompt for item in work)

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if fault:
                raise RuntimeError(f"injected fault (--fault-prompt) after step {step}")
            if self._aborting or all(job.cancelled for job in batch):
                pipe._interrupt = True  # diffusers skips the remaining steps (its documented interrupt)
            return {}

        started = time.perf_counter()
        self._call_started = time.monotonic()
        try:
            result = self.pipe(
                prompt=[item.prompt for item in calls],
                negative_prompt=[item.negative_prompt for item in calls] if key.negative else None,
                num_inference_steps=key.steps, guidance_scale=key.guidance_scale,
                height=key.height, width=key.width,
                generator=[torch.Generator("cpu").manual_seed(item.seed) for item in calls],
                output_type="pil", callback_on_step_end=on_step_end,
            )
            if self._aborting or all(job.cancelled for job in batch):
                self.metrics.interrupted.inc()
            if self._aborting and getattr(self.pipe, "_interrupt", True):  # its images are unfinished
                raise CallStopped("the server is shutting down: it stopped this request's pipeline call before "
                                  "its end")
            images = [_png_base64(image) for image in result.images[: len(work)]]
        except CallStopped as stopped:
            for job in batch:
                job.state = "done"
                settle(job.future, error=stopped)
        except Exception as error:  # noqa: BLE001 - fails this call's requests only
            logger.exception("pipeline call failed for %d request(s)", len(batch))
            self.metrics.failed_calls.inc()
            failure = PipelineFailed(f"the pipeline call failed: {type(error).__name__}: {error}")
            for job in batch:
                job.state = "done"
                settle(job.future, error=failure)
            self._check_health()
        else:
            offset = 0
            for job in batch:
                mine = images[offset: offset + job.images]
                seeds = [item.seed for item in job.payload]
                offset += job.images
                job.state = "done"
                settle(job.future, JobResult([GeneratedImage(png, seed) for png, seed in zip(mine, seeds)],
                                             self._calls, len(work), target))
        finally:
            self._call_started = None
            seconds = time.perf_counter() - started
            self._call_seconds = 0.8 * self._call_seconds + 0.2 * seconds
            self.metrics.call_seconds.observe(seconds)
            self._count_steps()
            self.metrics.running.set(0)
            self.batcher.finished(batch)

    def _count_steps(self) -> None:
        counts = self.accelerator.step_counts() if self.accelerator is not None else None
        if counts is None or self._steps_seen is None:
            return
        (refresh, cached), (refresh_before, cached_before) = counts, self._steps_seen
        self.metrics.unet_steps.labels("refresh").inc(refresh - refresh_before)
        self.metrics.unet_steps.labels("cached").inc(cached - cached_before)
        self._steps_seen = counts

    def _check_health(self) -> None:
        problem = self.accelerator.healthy() if self.accelerator is not None else None
        if problem is not None:
            logger.error("the engine stops serving: %s", problem)
            self._fail(problem)

    def _fail(self, reason: str) -> None:
        """Serve nothing more: /health and /ready say why, queued requests get 503, the CLI exits 1."""
        self.failure = reason
        self.state = "failed"
        self.metrics.ready.set(0)
        self.batcher.close(reason="shutdown")
