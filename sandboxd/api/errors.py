"""The one place where errors become HTTP responses: always `{"error": {"code", "message"}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sandboxd.errors import BadRequest, SandboxdError

log = logging.getLogger(__name__)

_PYDANTIC_CODES = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "json_invalid": "invalid_json",
}


def bad_request_from_validation(errors: list[dict], *, skip_loc_prefix: int = 0) -> BadRequest:
    """The first validation error as a BadRequest naming the field."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())][skip_loc_prefix:]
    field = ".".join(loc) or None
    kind = first.get("type", "invalid")
    if kind in _PYDANTIC_CODES:
        code = _PYDANTIC_CODES[kind]
    elif kind.endswith("_type") or kind in ("model_attributes_type", "dict_type"):
        code = "invalid_type"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "string_too_short",
                  "string_too_long", "too_short", "too_long", "literal_error"):  # fmt: skip
        code = "invalid_value"
    else:
        code = kind
    message = first.get("msg", "invalid input")
    if kind == "missing":
        message = "field required"
    elif kind == "extra_forbidden":
        message = "unknown field"
    return BadRequest(f"{field}: {message}" if field else message, code=code, field=field)


def error_response(error: SandboxdError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SandboxdError)
    async def _sandboxd_error(_request: Request, exc: SandboxdError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_request: Request, exc: RequestValidationError):
        # FastAPI prefixes locations with "query"/"path"/"body"
        return error_response(bad_request_from_validation(exc.errors(), skip_loc_prefix=1))

    @app.exception_handler(ValidationError)
    async def _validation(_request: Request, exc: ValidationError):
        return error_response(bad_request_from_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        error = SandboxdError(str(exc.detail), code=codes.get(exc.status_code, "http_error"))
        error.status = exc.status_code
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error", exc_info=exc)
        return error_response(SandboxdError("internal error; see the server log"))
