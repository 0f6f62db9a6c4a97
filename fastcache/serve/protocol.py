"""The HTTP API's shapes, in the OpenAI images convention, and the one error helper.

Request fields are validated here (types, presence, fixed ranges); limits that depend on what the
server warmed (sizes, largest batch, steps) are the engine's to check. The official ``openai``
client sends the OpenAI fields as they are and the others (``negative_prompt``,
``num_inference_steps``, ``guidance_scale``, ``seed``) through ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, field_validator

MAX_PROMPT_CHARS = 4000

FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``. Unknown fields are refused, so a misspelt option fails
    loudly instead of being ignored; the OpenAI fields are all known, and those asking for what
    this server cannot do (streaming, other formats) are refused by `unsupported` in words.
    Ranges that depend on the server (n, size, steps, seed + n) are the engine's to check."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: StrictStr | None = None
    n: StrictInt | None = 1  # None (the openai client's Optional): 1
    size: StrictStr | None = Field(default=None, description="WIDTHxHEIGHT, one of the sizes the server warmed, "
                                   "or 'auto' (the first of them)")
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    output_format: StrictStr | None = None
    # OpenAI fields accepted for compatibility that change nothing here.
    quality: StrictStr | None = None
    style: StrictStr | None = None
    complexity: StrictStr | None = None
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    moderation: Literal["auto", "low"] | None = None
    # OpenAI fields accepted only with the value that asks for what this server does anyway.
    background: Literal["auto", "opaque", "transparent"] | None = None
    stream: StrictBool | None = None
    partial_images: StrictInt | None = None
    output_compression: StrictInt | None = None
    frame_count: StrictInt | None = None
    frame_duration_ms: StrictInt | None = None
    svg: dict[str, Any] | None = None
    # Diffusion options (openai client: extra_body={...}).
    negative_prompt: StrictStr | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: StrictInt | None = None
    guidance_scale: FiniteFloat | None = None
    seed: StrictInt | None = Field(default=None, description="image i of the request uses seed + i; default: random")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of the first OpenAI option that asks for something this server does not
        do; None when it can answer as asked (PNG images, inline, opaque, all at once)."""
        if self.response_format == "url":
            return "response_format", ("response_format 'url' is not supported: this server returns images inline "
                                       "only; use 'b64_json'")
        if self.output_format not in (None, "png"):
            return "output_format", f"output_format {self.output_format!r} is not supported: only 'png' is produced"
        if self.stream:
            return "stream", "streaming is not supported: leave stream out (or false) to get the whole images at once"
        if self.partial_images not in (None, 0):
            return "partial_images", "partial_images needs streaming, which this server does not support; leave it out"
        if self.background == "transparent":
            return "background", "background 'transparent' is not supported: images are opaque; use 'auto' or 'opaque'"
        if self.output_compression not in (None, 100):
            return "output_compression", ("output_compression applies to JPEG and WebP; this server returns "
                                          "lossless PNG only: leave it out")
        for name in ("frame_count", "frame_duration_ms", "svg"):
            if getattr(self, name) is not None:
                return name, f"{name} is not supported: this server makes still PNG images only; leave it out"
        return None


class ImageData(BaseModel):
    b64_json: str  # a PNG
    seed: int  # the seed of this image's generator: resend it to get the same image
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastcache"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# OpenAI's error types by status (https://platform.openai.com/docs/guides/error-codes).
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
    405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    499: "client_closed_request", 500: "server_error", 503: "service_unavailable", 504: "timeout",
}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The one place an error body is made: ``{"error": {"message", "type", "param", "code"}}``."""
    info = ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


def validation_error_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) of pydantic's errors for a request body: the first error, in words."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    location = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if not location:
        return f"the request body must be a JSON object: {first.get('msg')}", None
    param = ".".join(str(part) for part in location)
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = "unknown parameter (misspelt? diffusion options go in the body, e.g. openai's extra_body)"
    elif first.get("type") == "missing":
        message = "this parameter is required"
    elif first.get("type") == "value_error" and "error" in first.get("ctx", {}):
        message = str(first["ctx"]["error"])  # the validator's own words, without pydantic's "Value error, "
    return f"{param}: {message}", param
