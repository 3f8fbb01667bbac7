"""Rendering on request in a canvas sandbox: HTML through its Chromium, JS canvas scripts
through @napi-rs/canvas, both by the template's renderer service (templates/builtin/files/
canvas-renderer.js, port 49982 inside the sandbox).

The control plane checks the request (400 naming the field), tenancy and state (404/409), that
the sandbox's template runs the renderer (409 `not_canvas_sandbox`), then reaches the renderer
the way the port proxy does (`PortAccess.target` → the worker's `PortTarget`). The renderer
enforces the timeout itself (a script is killed, a page closed) and saves the image inside the
sandbox before it answers; the HTTP timeout here is only a backstop.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from sandboxd.controlplane.files import check_path
from sandboxd.controlplane.ports import PortAccess
from sandboxd.controlplane.service import Caller, SandboxService
from sandboxd.errors import BadRequest, Conflict, PayloadTooLarge, SandboxdError, WorkerFailure
from sandboxd.store.models import Sandbox
from sandboxd.templates.spec import TemplateSpecError, load_template

RENDERER_PORT = 49982
RENDERER_SERVICE = "canvas-renderer"
MAX_SIDE = 4096  # CSS pixels
MIN_SCALE, MAX_SCALE = 0.25, 4.0
MAX_OUTPUT_PIXELS = 32 * 1024 * 1024  # width × height × scale²: 128 MiB of RGBA, within the 1 GiB sandbox
MAX_TIMEOUT_SECONDS = 120.0
BACKSTOP_SECONDS = 10.0  # beyond the renderer's own timeout, for the answer to travel back
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


class ScriptError(SandboxdError):
    status = 422
    code = "script_error"


class RenderTimeout(SandboxdError):
    status = 504
    code = "render_timeout"


class RendererUnavailable(SandboxdError):
    status = 503
    code = "renderer_unavailable"


@dataclass(frozen=True)
class RenderRequest:
    html: str | None
    script: str | None
    width: int
    height: int
    device_scale_factor: float
    timeout_seconds: float
    format: str
    quality: int | None
    path: str | None

    def check(self) -> RenderRequest:
        """The checks a field's own type cannot express; 400 naming the field."""
        if self.html is None and self.script is None:
            raise BadRequest("html: give exactly one of html or script", code="missing_field", field="html")
        if self.html is not None and self.script is not None:
            raise BadRequest("script: give exactly one of html or script, not both", code="invalid_value",
                             field="script")
        pixels = self.width * self.height * self.device_scale_factor**2
        if pixels > MAX_OUTPUT_PIXELS:
            raise BadRequest(
                f"device_scale_factor: width × height × device_scale_factor² is {pixels:.0f} pixels, "
                f"over the {MAX_OUTPUT_PIXELS} a render may have",
                code="invalid_value", field="device_scale_factor",
            )
        if self.quality is not None and self.format != "jpeg":
            raise BadRequest("quality: only for format \"jpeg\"", code="invalid_value", field="quality")
        if self.path is not None:
            check_path(self.path)
        return self

    def renderer_job(self) -> dict:
        job = {
            "kind": "html" if self.html is not None else "script",
            "source": self.html if self.html is not None else self.script,
            "width": self.width,
            "height": self.height,
            "scale": self.device_scale_factor,
            "timeout_ms": round(self.timeout_seconds * 1000),
            "format": self.format,
            "quality": self.quality if self.quality is not None else 90,
        }
        if self.path is not None:
            job["path"] = self.path
        return job


@dataclass(frozen=True)
class Rendered:
    image: bytes
    media_type: str
    path: str  # where the renderer saved it, inside the sandbox
    render_id: str
    width: int  # pixels
    height: int
    duration_ms: int


class CanvasService:
    def __init__(self, service: SandboxService):
        self.service = service
        self.ports = PortAccess(service)
        # No keep-alive: a guest IP is reused by the next sandbox on the same network slot.
        self.client = httpx.AsyncClient(
            trust_env=False, limits=httpx.Limits(max_connections=None, max_keepalive_connections=0)
        )

    async def render(self, caller: Caller, vm_id: str, request: RenderRequest) -> Rendered:
        sandbox = await self.service.get_running(caller, vm_id)
        self._check_renderer(sandbox)
        target = await self.ports.target(sandbox, RENDERER_PORT)
        url = f"{target.scheme}://{target.host}:{target.port}{target.path_prefix}/render"
        timeout = httpx.Timeout(request.timeout_seconds + BACKSTOP_SECONDS, connect=5.0)
        try:
            response = await self.client.post(url, json=request.renderer_job(), headers=target.headers,
                                              timeout=timeout)
        except httpx.TimeoutException:
            raise RenderTimeout(f"the renderer of {vm_id} did not answer in time", field="timeout_seconds") from None
        except httpx.TransportError as exc:
            raise RendererUnavailable(f"the canvas renderer of {vm_id} is not reachable: {exc}") from None
        finally:
            self.ports.touch(sandbox.id)
        if response.status_code != 200:
            raise _renderer_error(response)
        headers = response.headers
        return Rendered(
            image=response.content,
            media_type=headers.get("content-type", MEDIA_TYPES[request.format]),
            path=headers["x-render-path"],
            render_id=headers["x-render-id"],
            width=int(headers["x-render-width"]),
            height=int(headers["x-render-height"]),
            duration_ms=int(headers["x-render-duration-ms"]),
        )

    def _check_renderer(self, sandbox: Sandbox) -> None:
        try:
            spec = load_template(sandbox.template, self.service.settings.templates_dir)
        except TemplateSpecError:
            spec = None
        if spec is None or not any(s.name == RENDERER_SERVICE for s in spec.services):
            raise Conflict(
                f"sandbox {sandbox.id} runs template {sandbox.template!r}, which has no canvas renderer; "
                "create a sandbox with template \"canvas\"",
                code="not_canvas_sandbox", field="id",
            )


def _renderer_error(response: httpx.Response) -> SandboxdError:
    """The renderer's own error (it speaks the API's error shape), as the API's error class."""
    try:
        error = response.json()["error"]
        code, message, field = str(error["code"]), str(error["message"]), error.get("field")
    except (ValueError, KeyError, TypeError):
        return WorkerFailure(f"the canvas renderer answered {response.status_code}", code="render_failed")
    kinds: dict[int, type[SandboxdError]] = {
        400: BadRequest, 413: PayloadTooLarge, 422: ScriptError, 503: RendererUnavailable, 504: RenderTimeout,
    }
    return kinds.get(response.status_code, WorkerFailure)(message, code=code, field=field)
