"""Scale-out on Ray Serve: N replicas of the same app and engine, Ray's proxy and router in front.

Each replica is one `Engine` (one pipeline, one worker thread; a GPU or `replica_cpus` CPUs) behind
the same FastAPI app as the single-process server, mounted with ``serve.ingress``; replicas,
routing, health checks and rolling restarts are Ray's. Each replica warms every declared shape
before Ray sends it traffic (its constructor waits for the engine), from ``--compile-cache`` when
given (load it on every replica: inductor's cache directory is per machine).

Two ways to run it:

* ``python -m fastcache serve --replicas 2 [flags]``: starts a local Ray instance (or joins the
  one ``RAY_ADDRESS`` names), deploys, serves on --host/--port until SIGTERM;
* ``serve run fastcache.serve.ray_serve:build_app_from_args replicas=2 model=/models/sd15``: Ray's
  own CLI and config files (the arguments are ServeConfig fields).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from typing import Any

from ray import serve

from .config import ServeConfig, parse_ints, parse_sizes

logger = logging.getLogger("fastcache.serve")
APP_NAME = "fastcache"


@serve.ingress()
class FastCacheReplica:
    """One replica: an engine, warmed before the constructor returns, and the server's app."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        from .engine import Engine

        torch.set_num_threads(config.threads or max(1, int(config.replica_cpus)))
        self.engine = Engine(config)
        self.engine.start()
        if not self.engine.wait_ready():
            raise RuntimeError(f"the replica's engine did not become ready: {self.engine.failure}")

    def __serve_build_asgi_app__(self) -> Any:
        from .app import build_app

        return build_app(self.engine, manage_engine=False)

    def check_health(self) -> None:
        """Ray restarts a replica whose engine failed (e.g. an accelerator that can no longer serve) or
        whose pipeline call hangs."""
        problem = self.engine.health_problem()
        if problem is not None:
            raise RuntimeError(problem)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def application(config: ServeConfig) -> Any:
    """The Ray Serve application of `config`: `config.replicas` replicas, each with its resources."""
    options: dict[str, Any] = {"num_cpus": config.replica_cpus}
    if config.replica_gpus:
        options["num_gpus"] = config.replica_gpus
    deployment = serve.deployment(
        FastCacheReplica,
        name="FastCacheReplica",
        num_replicas=max(1, config.replicas),
        ray_actor_options=options,
        # Ray's proxy holds what a replica's own queue would refuse; the engine's queue then says 429.
        max_ongoing_requests=config.max_queue + config.images_per_call,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=config.request_timeout,
    )
    return deployment.bind(config)


_FIELD_PARSERS = {"sizes": parse_sizes, "batch_sizes": parse_ints}


def build_app_from_args(args: dict[str, str]) -> Any:
    """Application builder for ``serve run fastcache.serve.ray_serve:build_app_from_args key=value ...``."""
    fields = {item.name: item for item in dataclasses.fields(ServeConfig)}
    values: dict[str, Any] = {}
    for name, text in args.items():
        name = name.replace("-", "_")
        if name not in fields:
            raise ValueError(f"unknown ServeConfig field {name!r}")
        default = fields[name].default
        parse = _FIELD_PARSERS.get(name) or fields[name].metadata.get("parse")
        if isinstance(default, bool):
            values[name] = str(text).lower() in ("1", "true", "yes", "on")
        else:
            values[name] = parse(text) if parse is not None else text
    config = ServeConfig(**values)
    config.validate()
    return application(config)


def run_ray(config: ServeConfig) -> int:
    """Deploy on Ray and serve on config.host:port until SIGTERM / Ctrl+C; returns the exit status."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING)
    serve.start(http_options={"host": config.host, "port": config.port})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        serve.run(application(config), name=APP_NAME, route_prefix="/", blocking=False)
        logger.info("Ray Serve: %d replicas of %s on http://%s:%d", config.replicas,
                    config.model or "the tiny pipeline", config.host, config.port)
        while not stop.wait(1.0):
            pass
        logger.info("stopping: Ray drains the replicas (graceful_shutdown_timeout_s %g)", config.request_timeout)
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
