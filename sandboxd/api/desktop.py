"""The Desktop API: a `cua` sandbox's screen, pointer and keyboard under /v1/sandboxes/{id}/desktop.

    GET  screen | cursor | windows | screenshot?format=png|jpeg&quality=&x=&y=&width=&height=&scale=
    POST mouse/move | mouse/click | mouse/down | mouse/up | mouse/drag | mouse/scroll
    POST keyboard/type | keyboard/press | keyboard/down | keyboard/up
    POST windows/{window_id}/focus | open | parse | stream

Bodies are strict (unknown fields, wrong types → 400 naming the field); coordinates are
checked against the sandbox's screen (off-screen → 400 `off_screen`). A sandbox whose
template has no desktop answers 409 `no_desktop`. Logic: sandboxd/controlplane/desktop.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, model_validator

from sandboxd.api.auth import require_caller
from sandboxd.api.bodies import read_model
from sandboxd.api.proxy import _access, _client, _iso
from sandboxd.api.schemas import ErrorBody, StrictModel
from sandboxd.controlplane.desktop import DesktopService
from sandboxd.controlplane.ports import MAX_TOKEN_TTL_SECONDS
from sandboxd.controlplane.service import Caller

router = APIRouter(prefix="/v1/sandboxes", tags=["desktop"])
CallerDep = Annotated[Caller, Depends(require_caller)]
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 502)}
Coordinate = Annotated[int, Field(ge=0, le=65535)]
Button = Literal["left", "right", "middle"]
MAX_TEXT = 5000


def _desktop(request: Request) -> DesktopService:
    state = request.app.state
    desktop = getattr(state, "desktop", None)
    if desktop is None or desktop.service is not state.service:
        desktop = state.desktop = DesktopService(_access(request), _client(request))
    return desktop


# --- models ---------------------------------------------------------------------------------


class Point(StrictModel):
    x: Coordinate
    y: Coordinate


class ScreenInfo(StrictModel):
    width: int
    height: int
    depth: int


class Window(StrictModel):
    model_config = {**StrictModel.model_config, "populate_by_name": True}
    id: int = Field(description="X window id (for windows/{window_id}/focus)")
    title: str
    class_: str | None = Field(alias="class", description="WM_CLASS class, e.g. Chromium")
    pid: int | None
    x: int
    y: int
    width: int
    height: int
    visible: bool
    focused: bool


class WindowList(StrictModel):
    windows: list[Window]


class MoveRequest(Point):
    pass


class ClickRequest(StrictModel):
    x: Coordinate | None = Field(None, description="Where to click (both or neither); default: where the pointer is")
    y: Coordinate | None = None
    button: Button = "left"
    double: bool = Field(False, description="A double click (two presses 80 ms apart)")


class ClickResponse(StrictModel):
    x: int
    y: int
    button: str
    clicks: int


class ButtonRequest(StrictModel):
    x: Coordinate | None = None
    y: Coordinate | None = None
    button: Button = "left"


class DragRequest(StrictModel):
    model_config = {**StrictModel.model_config, "populate_by_name": False}
    from_: Annotated[list[Coordinate], Field(min_length=2, max_length=2)] = Field(alias="from", description="[x, y]")
    to: Annotated[list[Coordinate], Field(min_length=2, max_length=2)] = Field(description="[x, y]")
    button: Button = "left"


class ScrollRequest(StrictModel):
    direction: Literal["up", "down", "left", "right"] = "down"
    amount: int = Field(3, ge=1, le=100, description="Wheel clicks")
    x: Coordinate | None = Field(None, description="Move here first (give both or neither)")
    y: Coordinate | None = None


class TypeRequest(StrictModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT, description="Any Unicode text; \\n presses Return")
    delay_ms: int = Field(12, ge=0, le=50, description="Between keystrokes")


Keys = Annotated[str, Field(min_length=1, max_length=100)]


class KeysRequest(StrictModel):
    keys: Annotated[list[Keys], Field(min_length=1, max_length=100)] = Field(
        description='One key or chord ("enter", "ctrl+l", "ctrl+shift+t", "F5", "a") or a list pressed in turn'
    )

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data):
        if isinstance(data, dict) and isinstance(data.get("keys"), str):
            return {**data, "keys": [data["keys"]]}
        return data


class OpenRequest(StrictModel):
    url: str = Field(min_length=1, max_length=8192, description="http(s)://, file://, about: or data: URL")


class ParseRequest(StrictModel):
    detector: Literal["auto", "opencv", "omniparser"] = Field(
        "auto", description="auto: OmniParser when the operator configured its weights, else OpenCV"
    )
    region: Annotated[list[Coordinate], Field(min_length=4, max_length=4)] | None = Field(
        None, description="[x1, y1, x2, y2] (inclusive) to parse only part of the screen"
    )
    min_confidence: float = Field(0.5, ge=0.0, le=1.0)


class Element(StrictModel):
    id: int
    kind: Literal["text", "box", "icon"]
    text: str
    bbox: list[int] = Field(description="[x1, y1, x2, y2], inclusive, screen pixels")
    center: list[int] = Field(description="[x, y]: where to click")
    confidence: float


class ParseResponse(StrictModel):
    width: int
    height: int
    region: list[int]
    detector: str = Field(description="opencv or omniparser: what found the boxes (text is always RapidOCR)")
    omniparser_error: str | None = Field(None, description="Why configured OmniParser weights were not used")
    timings: dict[str, int]
    elements: list[Element]


class StreamRequest(StrictModel):
    view_only: bool = Field(False, description="true: the VNC server itself ignores input (x11vnc -viewonly)")
    expires_in_seconds: int | None = Field(
        None, ge=1, le=MAX_TOKEN_TTL_SECONDS, description="The link's token; default 3600, never past the sandbox"
    )


class StreamResponse(StrictModel):
    url: str = Field(description="noVNC in a browser; the token rides in the query (then in a cookie)")
    view_only: bool
    port: int = Field(description="The sandbox port behind the link: 6080 interactive, 6081 view-only")
    token: str = Field(description="The sandbox access token inside the URL (revoke: DELETE .../access-token)")
    expires_at: str


# --- routes ---------------------------------------------------------------------------------


async def _json(request: Request, caller: Caller, vm_id: str, method: str, path: str, *,
                params: dict | None = None, body: dict | None = None) -> JSONResponse:
    answer = await _desktop(request).call(caller, vm_id, method, path, params=params, body=body)
    return JSONResponse(answer.json())


def _body(model, *, by_alias: bool = False) -> dict:
    return model.model_dump(exclude_none=True, by_alias=by_alias)


@router.get("/{vm_id}/desktop/screen", response_model=ScreenInfo, responses=ERRORS)
async def screen(vm_id: str, request: Request, caller: CallerDep):
    """The screen's size in pixels and its colour depth."""
    return await _json(request, caller, vm_id, "GET", "/screen")


@router.get("/{vm_id}/desktop/cursor", response_model=Point, responses=ERRORS)
async def cursor(vm_id: str, request: Request, caller: CallerDep):
    """Where the pointer is."""
    return await _json(request, caller, vm_id, "GET", "/cursor")


@router.get("/{vm_id}/desktop/windows", response_model=WindowList, responses=ERRORS)
async def windows(vm_id: str, request: Request, caller: CallerDep):
    """The desktop's top-level windows (the window manager's client list), in stacking order."""
    return await _json(request, caller, vm_id, "GET", "/windows")


@router.post("/{vm_id}/desktop/windows/{window_id}/focus", responses=ERRORS)
async def focus_window(vm_id: str, window_id: int, request: Request, caller: CallerDep):
    """Raise and focus a window (404 `window_not_found` for an id not in the list)."""
    return await _json(request, caller, vm_id, "POST", "/windows/focus", body={"id": window_id})


@router.get(
    "/{vm_id}/desktop/screenshot",
    responses={**ERRORS, 200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "The image"}},
    response_class=Response,
)
async def screenshot(
    vm_id: str,
    request: Request,
    caller: CallerDep,
    format: Literal["png", "jpeg"] = "png",
    quality: Annotated[int, Query(ge=1, le=100, description="JPEG quality")] = 80,
    x: Annotated[int | None, Query(ge=0, description="Region: give x, y, width and height")] = None,
    y: Annotated[int | None, Query(ge=0)] = None,
    width: Annotated[int | None, Query(ge=1)] = None,
    height: Annotated[int | None, Query(ge=1)] = None,
    scale: Annotated[float, Query(ge=0.05, le=2.0, description="Resize the image by this factor")] = 1.0,
):
    """The screen (or a region of it) as PNG or JPEG."""
    params = {"format": format, "quality": quality, "scale": scale}
    params.update({k: v for k, v in (("x", x), ("y", y), ("width", width), ("height", height)) if v is not None})
    answer = await _desktop(request).call(caller, vm_id, "GET", "/screenshot", params=params)
    return Response(answer.body, media_type=answer.content_type, headers={"Cache-Control": "no-store"})


@router.post("/{vm_id}/desktop/mouse/move", response_model=Point, responses=ERRORS)
async def mouse_move(vm_id: str, request: Request, caller: CallerDep):
    body = await read_model(request, MoveRequest)
    return await _json(request, caller, vm_id, "POST", "/mouse/move", body=_body(body))


@router.post("/{vm_id}/desktop/mouse/click", response_model=ClickResponse, responses=ERRORS)
async def mouse_click(vm_id: str, request: Request, caller: CallerDep):
    body = await read_model(request, ClickRequest, empty_is_object=True)
    return await _json(request, caller, vm_id, "POST", "/mouse/click", body=_body(body))


@router.post("/{vm_id}/desktop/mouse/down", response_model=Point, responses=ERRORS)
async def mouse_down(vm_id: str, request: Request, caller: CallerDep):
    body = await read_model(request, ButtonRequest, empty_is_object=True)
    return await _json(request, caller, vm_id, "POST", "/mouse/down", body=_body(body))


@router.post("/{vm_id}/desktop/mouse/up", response_model=Point, responses=ERRORS)
async def mouse_up(vm_id: str, request: Request, caller: CallerDep):
    body = await read_model(request, ButtonRequest, empty_is_object=True)
    return await _json(request, caller, vm_id, "POST", "/mouse/up", body=_body(body))


@router.post("/{vm_id}/desktop/mouse/drag", responses=ERRORS)
async def mouse_drag(vm_id: str, request: Request, caller: CallerDep):
    """Press at `from`, move there to `to` in steps, release."""
    body = await read_model(request, DragRequest)
    return await _json(request, caller, vm_id, "POST", "/mouse/drag", body=_body(body, by_alias=True))


@router.post("/{vm_id}/desktop/mouse/scroll", responses=ERRORS)
async def mouse_scroll(vm_id: str, request: Request, caller: CallerDep):
    body = await read_model(request, ScrollRequest, empty_is_object=True)
    return await _json(request, caller, vm_id, "POST", "/mouse/scroll", body=_body(body))


@router.post("/{vm_id}/desktop/keyboard/type", responses=ERRORS)
async def keyboard_type(vm_id: str, request: Request, caller: CallerDep):
    """Type text into the focused window, keystroke by keystroke (xdotool type)."""
    body = await read_model(request, TypeRequest)
    return await _json(request, caller, vm_id, "POST", "/keyboard/type", body=_body(body))


@router.post("/{vm_id}/desktop/keyboard/press", responses=ERRORS)
async def keyboard_press(vm_id: str, request: Request, caller: CallerDep):
    """Press and release keys or chords; unknown key names → 400 `unknown_key`."""
    body = await read_model(request, KeysRequest)
    return await _json(request, caller, vm_id, "POST", "/keyboard/press", body=_body(body))


@router.post("/{vm_id}/desktop/keyboard/down", responses=ERRORS)
async def keyboard_down(vm_id: str, request: Request, caller: CallerDep):
    """Hold keys down (until keyboard/up)."""
    body = await read_model(request, KeysRequest)
    return await _json(request, caller, vm_id, "POST", "/keyboard/down", body=_body(body))


@router.post("/{vm_id}/desktop/keyboard/up", responses=ERRORS)
async def keyboard_up(vm_id: str, request: Request, caller: CallerDep):
    body = await read_model(request, KeysRequest)
    return await _json(request, caller, vm_id, "POST", "/keyboard/up", body=_body(body))


@router.post("/{vm_id}/desktop/open", responses=ERRORS)
async def open_url(vm_id: str, request: Request, caller: CallerDep):
    """Open a URL in the desktop's Chromium (a new tab)."""
    body = await read_model(request, OpenRequest)
    return await _json(request, caller, vm_id, "POST", "/open", body=_body(body))


@router.post("/{vm_id}/desktop/parse", response_model=ParseResponse, responses=ERRORS)
async def parse(vm_id: str, request: Request, caller: CallerDep):
    """Screen parsing: the UI elements on screen now, with bounding boxes, centres and text.

    Text comes from RapidOCR; boxes from OpenCV contours, or from OmniParser's icon detector
    when the operator configured its weights (`detector`: auto | opencv | omniparser; asking
    for omniparser without usable weights → 409 `omniparser_unavailable`)."""
    body = await read_model(request, ParseRequest, empty_is_object=True)
    return await _json(request, caller, vm_id, "POST", "/parse", body=_body(body))


@router.post("/{vm_id}/desktop/stream", response_model=StreamResponse, status_code=201, responses=ERRORS)
async def stream(vm_id: str, request: Request, caller: CallerDep):
    """A live-view link (noVNC through the port proxy) with a new sandbox access token.

    `view_only: true` reaches a VNC server that ignores all input; an interactive link also
    carries the sandbox's VNC password (in the URL fragment)."""
    body = await read_model(request, StreamRequest, empty_is_object=True)
    view = await _desktop(request).live_view(
        caller, vm_id, base_url=str(request.base_url), view_only=body.view_only,
        expires_in_seconds=body.expires_in_seconds,
    )  # fmt: skip
    return JSONResponse(
        {"url": view.url, "view_only": view.view_only, "port": view.port, "token": view.token,
         "expires_at": _iso(view.expires_at)},
        status_code=201,
        headers={"Cache-Control": "no-store"},
    )
