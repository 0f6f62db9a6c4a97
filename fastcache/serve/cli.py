"""``python -m fastcache serve``: flags -> ServeConfig -> uvicorn (or Ray Serve with --replicas).

Graceful shutdown: the first SIGTERM (or Ctrl+C) makes the server drain: new image requests and
/ready get 503 (a load balancer takes the server out), queued and running requests finish, then
uvicorn closes its connections and the process exits 0. A second signal stops now: queued
requests are dropped and the running call stops at its next step (all of them get 503), then the
process ends by that signal (status 143 for SIGTERM); a third stops waiting for connections. A pipeline that fails to load or warm, or an accelerator that can no longer serve,
ends the process with status 1 (so that a supervisor restarts it).
"""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType

from .config import ServeConfig, add_arguments, from_args

logger = logging.getLogger("fastcache.serve")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, with a drain before its own shutdown (see the module docstring)."""

        def __init__(self, config: uvicorn.Config, engine: object) -> None:
            super().__init__(config)
            self.engine = engine
            self.draining = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit:  # a third signal: uvicorn stops waiting for connections
                self.force_exit = True
                return
            if self.draining:  # second signal: stop now, then uvicorn's own shutdown
                logger.info("%s again: stopping now", signal.Signals(sig).name)
                self.engine.abort()
                super().handle_exit(sig, frame)
                return
            self.draining = True
            logger.info("%s: draining (new requests get 503), then exiting", signal.Signals(sig).name)
            self.engine.begin_drain()

        async def on_tick(self, counter: int) -> bool:
            if self.draining and not self.should_exit and self.engine.idle():
                logger.info("drained: shutting down")
                self.should_exit = True
            if self.engine.state == "failed" and not self.should_exit:
                logger.error("the engine failed (%s): shutting down", self.engine.failure)
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def serve(config: ServeConfig) -> int:
    """Serve until SIGTERM / Ctrl+C; returns the exit status."""
    if config.replicas:
        from .ray_serve import run_ray

        return run_ray(config)
    import uvicorn

    from .app import build_app
    from .engine import Engine

    logger.info("settings: %s", config.public())
    engine = Engine(config)
    app = build_app(engine)
    uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port, access_log=config.access_log,
                                    log_level="info", timeout_graceful_shutdown=config.request_timeout,
                                    limit_concurrency=config.connection_limit)
    server = _draining_server_class()(uvicorn_config, engine)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the server is reachable from other machines%s", config.host,
                       "" if config.api_key else " and has no API key (--api-key)")
    server.run()
    return 1 if engine.failure else 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = from_args(args)
    except ValueError as error:
        raise SystemExit(f"python -m fastcache serve: {error}") from None
    return serve(config)
