"""Canvas rendering: POST /v1/sandboxes/{id}/canvas/render in a sandbox of the canvas template.

Body: exactly one of `html` (a page, its JS canvas included, rendered by the sandbox's
Chromium) or `script` (JS run against @napi-rs/canvas with `canvas`, `ctx`, `width`, `height`
in scope), plus width, height, device_scale_factor, timeout_seconds, format, quality, path and
response. The answer is the image itself (`X-Render-*` headers name the file saved in the
sandbox), or JSON with the image in base64 when `response` is "json". Errors: 400 naming the
field, 404, 409 `not_canvas_sandbox`, 422 `script_error` with the JS error, 504 `render_timeout`.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from sandboxd.api.auth import require_caller
from sandboxd.api.bodies import read_model
from sandboxd.api.schemas import ErrorBody, StrictModel
from sandboxd.controlplane.canvas import (
    MAX_SCALE,
    MAX_SIDE,
    MAX_TIMEOUT_SECONDS,
    MIN_SCALE,
    CanvasService,
    Rendered,
    RenderRequest,
)
from sandboxd.controlplane.service import Caller

router = APIRouter(prefix="/v1/sandboxes", tags=["canvas"])
CallerDep = Annotated[Caller, Depends(require_caller)]
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422, 502, 503, 504)}


class RenderBody(StrictModel):
    html: str | None = Field(None, min_length=1, description="An HTML page (JS canvas included), rendered by Chromium")
    script: str | None = Field(
        None, min_length=1,
        description="JS run against @napi-rs/canvas; in scope: canvas, ctx (already scaled by device_scale_factor), "
                    "width, height, deviceScaleFactor, createCanvas, loadImage, Image, Path2D, ImageData, DOMMatrix, "
                    "GlobalFonts. It may await.",
    )
    width: int = Field(800, ge=1, le=MAX_SIDE, description="CSS pixels")
    height: int = Field(600, ge=1, le=MAX_SIDE, description="CSS pixels")
    device_scale_factor: float = Field(1.0, ge=MIN_SCALE, le=MAX_SCALE,
                                       description="The image is width × height times this")
    timeout_seconds: float = Field(30.0, gt=0, le=MAX_TIMEOUT_SECONDS,
                                   description="A render still running then is stopped: 504 render_timeout")
    format: Literal["png", "jpeg"] = "png"
    quality: int | None = Field(None, ge=1, le=100, description="JPEG quality (default 90)")
    path: str | None = Field(None, min_length=1, description="Where to save the image in the sandbox "
                             "(relative to /workspace); default /tmp/renders/<render_id>.png")
    response: Literal["image", "json"] = Field("image", description="\"json\": the image in base64 with its details")


def _canvas(request: Request) -> CanvasService:
    service = request.app.state.service
    canvas = getattr(service, "canvas", None)
    if canvas is None:
        canvas = service.canvas = CanvasService(service)
    return canvas


def _details(rendered: Rendered, body: RenderBody) -> dict:
    return {
        "render_id": rendered.render_id,
        "path": rendered.path,
        "media_type": rendered.media_type,
        "width": rendered.width,
        "height": rendered.height,
        "device_scale_factor": body.device_scale_factor,
        "bytes": len(rendered.image),
        "duration_ms": rendered.duration_ms,
    }


@router.post(
    "/{vm_id}/canvas/render",
    responses={
        200: {"description": "The image (or JSON with `image_base64` when response is \"json\")",
              "content": {"image/png": {}, "image/jpeg": {}, "application/json": {}}},
        **ERRORS,
    },
    response_class=Response,
    openapi_extra={"requestBody": {"required": True,
                                   "content": {"application/json": {"schema": RenderBody.model_json_schema()}}}},
)
async def render(vm_id: str, request: Request, caller: CallerDep):
    """Render HTML or a JS canvas script to PNG/JPEG in a canvas sandbox; the image is also saved there."""
    body = await read_model(request, RenderBody)
    render_request = RenderRequest(
        html=body.html, script=body.script, width=body.width, height=body.height,
        device_scale_factor=body.device_scale_factor, timeout_seconds=body.timeout_seconds,
        format=body.format, quality=body.quality, path=body.path,
    ).check()
    rendered = await _canvas(request).render(caller, vm_id, render_request)
    details = _details(rendered, body)
    if body.response == "json":
        return JSONResponse({**details, "image_base64": base64.b64encode(rendered.image).decode()})
    headers = {
        "X-Render-Id": rendered.render_id,
        "X-Render-Path": rendered.path,
        "X-Render-Width": str(rendered.width),
        "X-Render-Height": str(rendered.height),
        "X-Render-Duration-Ms": str(rendered.duration_ms),
        "Cache-Control": "no-store",
    }
    return Response(rendered.image, media_type=rendered.media_type, headers=headers)
