"""JSON request bodies → strict pydantic models, with the API's 400/413 errors."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from sandboxd.api.errors import bad_request_from_validation
from sandboxd.errors import BadRequest, PayloadTooLarge

MAX_BODY_BYTES = 1024 * 1024
ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_model(raw: bytes, model: type[ModelT], *, empty_is_object: bool = False) -> ModelT:
    """Validate a JSON body. An empty body is an error unless empty_is_object (then `{}`)."""
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
    if empty_is_object and not raw.strip():
        raw = b"{}"
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_type")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad_request_from_validation(exc.errors()) from None


async def read_model(request: Request, model: type[ModelT], *, empty_is_object: bool = False) -> ModelT:
    return parse_model(await request.body(), model, empty_is_object=empty_is_object)
