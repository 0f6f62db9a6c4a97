"""The FastAPI app: a thin HTTP layer over an `Engine` (which knows nothing of HTTP).

The same app serves from ``python -m fastcache serve`` (uvicorn) and from each Ray Serve replica.
Handlers never call the pipeline: they queue a job and await its future, racing it against the
request's deadline and the client's disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.authentication import AuthenticationMiddleware

from .batcher import Job, JobDropped, QueueFull
from .engine import CallStopped, Engine, GenerationParams, JobResult, NotReady, PipelineFailed, RequestRejected
from .middleware import BearerKey, BodyLimit, RequestMetrics, unauthorized
from .protocol import (
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    error_response,
    validation_error_message,
)

logger = logging.getLogger("fastcache.serve")

GENERATIONS = "/v1/images/generations"
REPLICA = f"{socket.gethostname()}:{os.getpid()}"
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; nobody receives it
# The openai client retries 5xx twice unless told not to: not for a failed call, nor a timeout whose
# call ran (a retry would run it again, on a server already too slow for it).
NO_RETRY = {"x-should-retry": "false"}


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body is read already: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _outcome(engine: Engine, job: Job, request: Request) -> Response | JobResult:
    """The job's images, or the error response for its timeout, drop, failure or a gone client."""
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=max(0.0, job.deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result not in done:
        reason = "disconnected" if gone in done else "timeout"
        started = not engine.cancel(job, reason)
        result.cancel()  # a late result is not wanted (and an error of it never retrieved)
        if reason == "disconnected":
            return Response(status_code=CLIENT_CLOSED)
        timeout = engine.config.request_timeout
        where = "while its pipeline call ran" if started else "before its pipeline call started (dropped)"
        return error_response(504, f"the request timed out after {timeout:g} s {where} (--request-timeout)",
                              code="timeout", headers=NO_RETRY if started else None)
    try:
        return result.result()
    except JobDropped as dropped:
        if dropped.reason == "timeout":
            return error_response(504, f"the request waited {engine.config.request_timeout:g} s and was dropped "
                                  "before its pipeline call started (--request-timeout)", code="timeout")
        return error_response(503, f"the request was dropped: {dropped.reason}", headers={"Retry-After": "5"})
    except CallStopped as stopped:
        return error_response(503, str(stopped), headers={"Retry-After": "5"})
    except PipelineFailed as failed:  # the same request would likely fail again: no client retries
        return error_response(500, str(failed), code="pipeline_failed", headers=NO_RETRY)


def build_app(engine: Engine, *, manage_engine: bool = True) -> FastAPI:
    """The HTTP API over `engine`. With `manage_engine`, the app's lifespan starts the engine
    (loading and warming in the background, /ready says when done) and stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.stop)

    config = engine.config
    # The interactive API pages are open to anyone who can connect: only on a server without a key.
    pages = {} if config.api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="fastcache", summary="OpenAI-compatible image generation with fastcache",
                  lifespan=lifespan, **pages)
    if config.api_key:
        app.add_middleware(AuthenticationMiddleware, backend=BearerKey(config.api_key), on_error=unauthorized)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout)
    app.add_middleware(RequestMetrics, metrics=engine.metrics, path=GENERATIONS)  # outermost: sees every status

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_error_message(list(error.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail)
        if message == "There was an error parsing the body":  # FastAPI's words for a body json.loads refused
            message = ("the request body could not be read as JSON: it must be UTF-8, with integers of at most "
                       "4300 digits and nesting of reasonable depth")
        return error_response(error.status_code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error in %s", request.url.path)
        return error_response(500, f"internal error ({type(error).__name__}; the server's log has the details)")

    errors = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503, 504)}

    @app.post(GENERATIONS, response_model=ImagesResponse, responses=errors)
    async def create_images(body: ImageGenerationRequest, request: Request) -> Response:
        unsupported = body.unsupported()
        if unsupported is not None:
            param, message = unsupported
            return error_response(400, message, param=param)
        params = GenerationParams(
            prompt=body.prompt, n=1 if body.n is None else body.n, size=body.size, negative_prompt=body.negative_prompt,
            num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale, seed=body.seed,
            model=body.model,
        )
        try:
            job = engine.submit(params)
        except RequestRejected as rejected:
            status = 404 if rejected.code == "model_not_found" else 400
            return error_response(status, str(rejected), param=rejected.param, code=rejected.code)
        except NotReady as not_ready:
            return error_response(503, str(not_ready), headers={"Retry-After": "5"})
        except QueueFull as full:
            return error_response(429, f"the server is busy: {full}; retry later",
                                  headers={"Retry-After": str(engine.retry_after())})
        outcome = await _outcome(engine, job, request)
        if isinstance(outcome, Response):
            return outcome
        payload = ImagesResponse(created=int(time.time()), data=[
            ImageData(b64_json=image.png_base64, seed=image.seed) for image in outcome.images])
        # Which pipeline call made the images, and how full it was: for tests, load balancers, curiosity.
        headers = {"x-fastcache-replica": REPLICA, "x-fastcache-call": str(outcome.call),
                   "x-fastcache-batch": f"{outcome.call_images}/{outcome.batch_size}"}
        return Response(payload.model_dump_json(exclude_none=True), media_type="application/json", headers=headers)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=engine.model_id, created=engine.created)])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def model(model_id: str) -> Response:
        if model_id != engine.model_id:
            return error_response(404, f"model {model_id!r} is not served here; this server serves "
                                  f"{engine.model_id!r}", param="model", code="model_not_found")
        card = ModelCard(id=engine.model_id, created=engine.created)
        return Response(card.model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: 200 unless the engine failed for good or its call hangs (then restart the process)."""
        problem = engine.health_problem()
        return JSONResponse({"status": engine.state, "replica": REPLICA, "failure": problem},
                            status_code=503 if problem else 200)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 once every declared shape is warmed; 503 before, while draining, after a failure."""
        return JSONResponse(engine.status(), status_code=200 if engine.state == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        content, media_type = engine.metrics.render()
        return Response(content, media_type=media_type)

    return app
