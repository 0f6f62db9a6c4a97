"""The HTTP API's shapes, in the OpenAI images convention, and the one error helper.

Request fields are validated here (types, presence, fixed ranges); limits that depend on what the
server warmed (sizes, largest batch, steps) are the engine's to check. The official ``openai``
client sends the OpenAI fields as they are and the others (``negative_prompt``,
``num_inference_steps``, ``guidance_scale``, ``seed``) through ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictInt, StrictStr, field_validator

MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**53 - 1  # exact in every JSON client (JavaScript numbers included)

FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``. Unknown fields are refused, so a misspelt option fails
    loudly instead of being ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: StrictStr | None = None
    n: StrictInt = Field(default=1, ge=1)
    size: StrictStr | None = Field(default=None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$",
                                   description="WIDTHxHEIGHT; one of the sizes the server warmed")
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    # OpenAI fields accepted for compatibility; quality, style and user change nothing here.
    output_format: Literal["png"] | None = None
    quality: StrictStr | None = None
    style: StrictStr | None = None
    user: StrictStr | None = None
    # Diffusion options (openai client: extra_body={...}).
    negative_prompt: StrictStr | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: StrictInt | None = Field(default=None, ge=1)
    guidance_scale: FiniteFloat | None = None
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED,
                                   description="image i of the request uses seed + i; default: random")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt


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
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
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
    return f"{param}: {message}", param
