"""`ServeConfig`: every option of ``python -m fastcache serve``, one dataclass field per CLI flag.

The parser is generated from the fields (name ``max_queue`` -> flag ``--max-queue``, help and
parser in the field's metadata), so a flag cannot exist without its field or drift from it;
`validate()` checks the values once, before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

API_KEY_ENV = "FASTCACHE_API_KEY"
ACCELERATORS = ("fastcache", "deepcache", "none")
DTYPES = ("auto", "fp16", "bf16", "fp32")


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``512x512,768x512`` (width x height) or ``512`` (square) -> ((512, 512), (768, 512))."""
    sizes = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        width, _, height = part.partition("x")
        try:
            sizes.append((int(width), int(height or width)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not WIDTHxHEIGHT") from None
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size")
    return tuple(sizes)


def parse_ints(text: str) -> tuple[int, ...]:
    """``1,2,4`` -> (1, 2, 4)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return values


def size_label(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _flag(help: str, parse: Callable[[str], Any] | None = None, *, negate: bool = False,
          choices: tuple[str, ...] | None = None, metavar: str | None = None) -> dict[str, Any]:
    return {"help": help, "parse": parse, "negate": negate, "choices": choices, "metavar": metavar}


@dataclass
class ServeConfig:
    """What the server loads, warms and accepts. Defaults serve the embedded tiny pipeline on CPU."""

    # -- the model and how it runs --------------------------------------------------------------
    model: str | None = field(default=None, metadata=_flag(
        "a local diffusers folder (SD 1.x/2.x or SDXL, from_pretrained); default: the embedded tiny "
        "SD pipeline (random weights, no download)", metavar="PATH"))
    model_name: str | None = field(default=None, metadata=_flag(
        "the model id of /v1/models and of requests' `model` (default: the folder's name, or fastcache-tiny-sd)"))
    dtype: str = field(default="auto", metadata=_flag("auto: fp16 on CUDA, fp32 on CPU", choices=DTYPES))
    device: str | None = field(default=None, metadata=_flag("default: cuda if available, else cpu"))
    threads: int | None = field(default=None, metadata=_flag(
        "torch intra-op threads (CPU); default: torch's (the cores)", int))
    sizes: tuple[tuple[int, int], ...] | None = field(default=None, metadata=_flag(
        "the image sizes served and warmed at start, WIDTHxHEIGHT, comma-separated; the first is the "
        "default size (default: the model's native size)", parse_sizes))
    batch_sizes: tuple[int, ...] = field(default=(1, 2, 4), metadata=_flag(
        "the images per pipeline call warmed at start, for every size; a call is padded up to the "
        "nearest one", parse_ints))
    accelerator: str = field(default="fastcache", metadata=_flag(
        "what runs the U-Net: fastcache, deepcache (the DeepCache package's helper) or none (plain "
        "diffusers); the same server otherwise, so the three can be compared", choices=ACCELERATORS))
    cache_interval: int = field(default=3, metadata=_flag("DeepCache's cache_interval (fastcache, deepcache)", int))
    cache_branch_id: int = field(default=0, metadata=_flag("DeepCache's cache_branch_id (fastcache, deepcache)", int))
    gate_step: int | None = field(default=None, metadata=_flag(
        "TGATE on top of fastcache from this step on: no classifier-free guidance after it, "
        "cross-attention reused (accelerate's gate_step; --accelerator fastcache, a model with guidance); "
        "a request with fewer steps than this runs plain fastcache", int))
    compile_backend: str = field(default="inductor", metadata=_flag(
        "fastcache's torch.compile backend (eager: dynamo only, for tests)"))
    compile_cache: str | None = field(default=None, metadata=_flag(
        "fastcache.load_compile_cache(FILE) before warm-up; written there after warm-up when missing",
        metavar="FILE"))
    # -- defaults and limits of a request -------------------------------------------------------
    default_steps: int = field(default=25, metadata=_flag("num_inference_steps of a request that gives none", int))
    max_steps: int = field(default=100, metadata=_flag("the largest num_inference_steps accepted", int))
    default_guidance_scale: float = field(default=7.5, metadata=_flag(
        "guidance_scale of a request that gives none (> 1: warm-up prepares classifier-free guidance)", float))
    # -- HTTP -----------------------------------------------------------------------------------
    host: str = field(default="127.0.0.1", metadata=_flag("address to bind; 0.0.0.0 exposes the server"))
    port: int = field(default=8000, metadata=_flag("TCP port", int))
    api_key: str | None = field(default=None, metadata=_flag(
        f"require `Authorization: Bearer KEY` on /v1/* (default: ${API_KEY_ENV} if set, else no key)", metavar="KEY"))
    max_body_bytes: int = field(default=64 * 1024, metadata=_flag("larger request bodies get 413", int))
    body_timeout: float = field(default=30.0, metadata=_flag(
        "seconds a request body may take to arrive; a slower one gets 408 (a stalled client holds no "
        "connection forever, nor a shutdown)", float))
    max_connections: int | None = field(default=None, metadata=_flag(
        "open connections (idle keep-alive ones included) past which a request gets uvicorn's plain "
        "503 and its connection is closed, so file descriptors and memory stay bounded (default: 512, "
        "or --max-queue + the largest batch + 2 where that is more; this process only: Ray's proxy "
        "has its own)", int))
    access_log: bool = field(default=False, metadata=_flag("log every HTTP request (uvicorn's access log)"))
    # -- batching, queueing, timeouts -----------------------------------------------------------
    max_queue: int = field(default=64, metadata=_flag("requests waiting for the pipeline; more get 429", int))
    max_batch_delay_ms: float = field(default=20.0, metadata=_flag(
        "how long the oldest waiting request waits for others to share its pipeline call", float))
    max_batch_size: int | None = field(default=None, metadata=_flag(
        "most images in one pipeline call made of several requests (default: the largest batch size)", int))
    batching: bool = field(default=True, metadata=_flag(
        "never run two requests in one pipeline call", negate=True))
    request_timeout: float = field(default=300.0, metadata=_flag(
        "seconds from arrival to response; past it 504, and the request is dropped if it has not started", float))
    # -- scale-out ------------------------------------------------------------------------------
    replicas: int = field(default=0, metadata=_flag(
        "0: serve from this process; N: a Ray Serve application of N replicas behind Ray's proxy "
        "(pip install 'fastcache-diffusers[ray]')", int))
    replica_cpus: float = field(default=1.0, metadata=_flag("CPUs per Ray replica (its torch threads too)", float))
    replica_gpus: float = field(default=0.0, metadata=_flag("GPUs per Ray replica (1 on a GPU cluster)", float))
    # -- testing --------------------------------------------------------------------------------
    fault_prompt: str | None = field(default=None, metadata=_flag(
        "testing only: a pipeline call whose batch holds this prompt raises inside the call (after "
        "its first step), to check that a failing call fails only its own requests", metavar="TEXT"))

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None

    @property
    def largest_batch(self) -> int:
        return max(self.batch_sizes)

    @property
    def least_connections(self) -> int:
        """The queued requests' connections, a running call's (one request per image at most), and
        one each for /health and /metrics."""
        return self.max_queue + self.images_per_call + 2

    @property
    def connection_limit(self) -> int:
        return self.max_connections or max(512, self.least_connections)

    @property
    def images_per_call(self) -> int:
        """The most images one pipeline call may combine from several requests."""
        return self.max_batch_size or self.largest_batch

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first value out of range."""
        problems = []
        if self.sizes is not None:
            for width, height in self.sizes:
                if width <= 0 or height <= 0 or width % 8 or height % 8:
                    problems.append(f"--sizes {width}x{height}: width and height must be positive multiples of 8")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            problems.append("--batch-sizes must be positive")
        if self.max_batch_size is not None and not 1 <= self.max_batch_size <= self.largest_batch:
            problems.append(f"--max-batch-size must be in 1..{self.largest_batch} (the largest of --batch-sizes)")
        if self.cache_interval < 1:
            problems.append("--cache-interval must be at least 1")
        if self.gate_step is not None and self.gate_step < 1:
            problems.append("--gate-step must be at least 1")
        if self.gate_step is not None and self.accelerator != "fastcache":
            problems.append(f"--gate-step needs --accelerator fastcache (got {self.accelerator})")
        if not 1 <= self.default_steps <= self.max_steps:
            problems.append("--default-steps must be in 1..--max-steps")
        if not 1.0 < self.default_guidance_scale <= 100.0:
            problems.append("--default-guidance-scale must be in (1, 100]")
        if self.max_queue < 1:
            problems.append("--max-queue must be at least 1")
        if self.max_batch_delay_ms < 0:
            problems.append("--max-batch-delay-ms must be >= 0")
        if self.request_timeout <= 0:
            problems.append("--request-timeout must be positive")
        if self.body_timeout <= 0:
            problems.append("--body-timeout must be positive")
        if self.max_connections is not None and self.max_connections < self.least_connections:
            problems.append(f"--max-connections must be at least --max-queue + the largest batch + 2 "
                            f"({self.least_connections}): the queued requests' connections, a running "
                            "call's, and one each for /health and /metrics")
        if self.max_body_bytes < 1024:
            problems.append("--max-body-bytes must be at least 1024")
        if not 0 < self.port < 65536:
            problems.append("--port must be in 1..65535")
        if self.threads is not None and self.threads < 1:
            problems.append("--threads must be at least 1")
        if self.replicas < 0 or self.replica_cpus <= 0 or self.replica_gpus < 0:
            problems.append("--replicas must be >= 0, --replica-cpus > 0, --replica-gpus >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def public(self) -> dict[str, Any]:
        """The settings as JSON-ready values, the API key masked (for logs, /v1/models, bench files)."""
        values = dataclasses.asdict(self)
        values["api_key"] = "***" if self.api_key else None
        return values


def _flag_name(name: str, negate: bool) -> str:
    return "--no-" + name.replace("_", "-") if negate else "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeConfig field, with the field's default, help and parser."""
    for item in dataclasses.fields(ServeConfig):
        meta = item.metadata
        flag = _flag_name(item.name, meta["negate"])
        if item.type in ("bool", bool):
            action = "store_false" if meta["negate"] else "store_true"
            parser.add_argument(flag, dest=item.name, action=action, default=item.default, help=meta["help"])
            continue
        kwargs: dict[str, Any] = {"dest": item.name, "default": item.default, "help": meta["help"]}
        if meta["parse"] is not None:
            kwargs["type"] = meta["parse"]
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag, **kwargs)


def from_args(args: argparse.Namespace) -> ServeConfig:
    """The config of parsed flags, validated."""
    config = ServeConfig(**{item.name: getattr(args, item.name) for item in dataclasses.fields(ServeConfig)})
    config.validate()
    return config
