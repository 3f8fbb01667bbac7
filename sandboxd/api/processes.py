"""Processes and PTYs under /v1/sandboxes/{id}: streaming exec (SSE), background
processes (list, status, output, follow, stdin, signal, wait) and the PTY WebSocket.

The service logic is in sandboxd/controlplane/processes.py; the guest agent's side in
sandboxd/guest/_procs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.websockets import WebSocketDisconnect, WebSocketState

from sandboxd.api.auth import require_caller
from sandboxd.api.bodies import parse_model
from sandboxd.api.schemas import ErrorBody, ExecRequest, StrictModel
from sandboxd.controlplane.processes import MAX_WAIT_SECONDS, ProcessService
from sandboxd.controlplane.service import Caller
from sandboxd.errors import BadRequest, PayloadTooLarge, SandboxdError, Unauthorized

router = APIRouter(prefix="/v1/sandboxes", tags=["processes"])
CallerDep = Annotated[Caller, Depends(require_caller)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 502, 503)}
MAX_STDIN_BYTES = 4 * 1024 * 1024
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- shapes (OpenAPI) ------------------------------------------------------------------


class ProcessInfo(BaseModel):
    process_id: str
    pid: int
    command: str
    cwd: str
    user: str
    background: bool
    state: Literal["running", "exited"]
    exit_code: int | None = Field(description="128+N when killed by signal N; null while running")
    timed_out: bool
    started_at: str
    finished_at: str | None
    duration_ms: float | None
    output_bytes: int = Field(description="bytes of stdout+stderr produced so far (the offset space)")
    stdin_open: bool
    timeout_seconds: float | None = None


class ProcessList(BaseModel):
    processes: list[ProcessInfo]


class ProcessOutput(BaseModel):
    process_id: str
    output: str = Field(description="stdout and stderr interleaved as produced, from since_offset")
    stdout: str
    stderr: str
    since_offset: int
    next_offset: int = Field(description="pass as since_offset to read only newer output")
    truncated: bool = Field(description="older output was dropped (1 MiB is kept per process)")
    state: Literal["running", "exited"]
    exit_code: int | None
    timed_out: bool


class StdinRequest(StrictModel):
    data: str = Field(default="", max_length=MAX_STDIN_BYTES)
    eof: bool = Field(default=False, description="close the process's stdin after writing data")


class SignalRequest(StrictModel):
    signal: str = Field(default="SIGTERM", min_length=1, max_length=16,
                        description="SIGTERM SIGINT SIGKILL SIGHUP SIGQUIT SIGUSR1 SIGUSR2 SIGSTOP SIGCONT SIGWINCH SIGALRM")


SSE_DOC = (
    "With `Accept: text/event-stream`: Server-Sent Events `stdout` / `stderr` "
    '(`data: {"data": "...", "offset": N}`) as the command produces them, then one `exit` '
    '(`{"exit_code", "timed_out", "duration_ms"}`); `error` if the sandbox fails mid-stream. '
    "A client that disconnects kills the command's process group."
)
EXEC_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}, "example": (
        'event: stdout\ndata: {"data": "a\\n", "offset": 0}\n\n'
        'event: exit\ndata: {"exit_code": 0, "timed_out": false, "duration_ms": 1003.1}\n\n')}},
        "description": "The result; or, with `Accept: text/event-stream`, its events as produced. "
                       "The same path opened as a WebSocket runs the command too: send the exec body "
                       "as the first text frame; JSON frames `{\"type\": \"stdout\"|\"stderr\"|\"exit\", ...}` "
                       "come back, errors as `{\"type\": \"error\", \"error\"}` and close code 4000+status; "
                       "closing early kills the command."},
    202: {"model": ProcessInfo, "description": "`background: true`: the process, started."},
}


# --- helpers ---------------------------------------------------------------------------


def _processes(request_or_ws) -> ProcessService:
    state = request_or_ws.app.state
    svc = getattr(state, "processes", None)
    if svc is None:
        svc = state.processes = ProcessService(state.service)
    return svc


def wants_sse(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "").lower()


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _sse_body(events):
    """Worker events -> SSE. Heartbeats become comments (they also detect a gone client)."""
    try:
        async for event in events:
            kind = event.get("type")
            if kind in ("stdout", "stderr"):
                yield _sse(kind, {"data": event.get("data", ""), "offset": event.get("offset")})
            elif kind == "exit":
                yield _sse("exit", {k: event.get(k) for k in ("exit_code", "timed_out", "duration_ms", "next_offset")})
            else:
                yield b": keepalive\n\n"
    except SandboxdError as exc:
        yield _sse("error", exc.to_body())
    finally:
        await events.aclose()


def sse_response(events) -> StreamingResponse:
    return StreamingResponse(_sse_body(events), media_type="text/event-stream", headers=SSE_HEADERS)


async def exec_special(request: Request, caller: Caller, vm_id: str, body: ExecRequest):
    """The exec route's streaming (`Accept: text/event-stream`) and background forms."""
    svc = _processes(request)
    if body.background:
        return JSONResponse(await svc.exec_background(caller, vm_id, body), status_code=202)
    return sse_response(await svc.exec_stream(caller, vm_id, body))


async def exec_blocking(request: Request, caller: Caller, vm_id: str, body: ExecRequest):
    """The plain exec, cancelled if the client hangs up first: the worker's call is dropped,
    and the guest agent kills a command whose caller went away."""
    call = asyncio.ensure_future(request.app.state.service.exec(caller, vm_id, body))

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({call, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not call.done():
            call.cancel()
    if call.cancelled() or not call.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await call
        return JSONResponse({"error": {"code": "client_disconnected", "message": "the client went away"}},
                            status_code=499)  # fmt: skip
    return call.result()


# --- routes ----------------------------------------------------------------------------


@router.get("/{vm_id}/processes", response_model=ProcessList, responses=ERRORS)
async def list_processes(vm_id: str, request: Request, caller: CallerDep):
    """Background processes of the sandbox, running and recently exited (the last 16)."""
    return await _processes(request).list(caller, vm_id)


@router.get("/{vm_id}/processes/{process_id}", response_model=ProcessInfo, responses=ERRORS)
async def get_process(vm_id: str, process_id: str, request: Request, caller: CallerDep):
    return await _processes(request).get(caller, vm_id, process_id)


@router.get(
    "/{vm_id}/processes/{process_id}/output",
    response_model=ProcessOutput,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                               "description": "JSON; or with follow=true, SSE like a streaming exec"}},
)
async def process_output(
    vm_id: str,
    process_id: str,
    request: Request,
    caller: CallerDep,
    since_offset: Annotated[int, Query(ge=0, description="byte offset (stdout+stderr) to start from")] = 0,
    follow: Annotated[bool, Query(description="stream as SSE until the process exits")] = False,
):
    """Output so far from `since_offset`; `follow=true` streams it as it is produced (the
    process keeps running when the follower disconnects)."""
    svc = _processes(request)
    if follow:
        return sse_response(await svc.follow(caller, vm_id, process_id, since_offset))
    return await svc.output(caller, vm_id, process_id, since_offset)


@router.post(
    "/{vm_id}/processes/{process_id}/stdin",
    response_model=ProcessInfo,
    responses=ERRORS,
    openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": StdinRequest.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }}},
)
async def process_stdin(
    vm_id: str,
    process_id: str,
    request: Request,
    caller: CallerDep,
    eof: Annotated[bool, Query(description="for a raw body: close stdin after it")] = False,
):
    """Write to the process's stdin: `{"data", "eof"}` as JSON, or any other body raw."""
    raw = await request.body()
    if len(raw) > MAX_STDIN_BYTES:
        raise PayloadTooLarge(f"stdin: body over {MAX_STDIN_BYTES} bytes", field="stdin")
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        parsed = parse_model(raw, StdinRequest, empty_is_object=True)
        data, eof = parsed.data.encode(), parsed.eof or eof
    else:
        data = raw
    return await _processes(request).stdin(caller, vm_id, process_id, data, eof)


@router.post(
    "/{vm_id}/processes/{process_id}/signal",
    response_model=ProcessInfo,
    responses=ERRORS,
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": SignalRequest.model_json_schema()}}}},
)
async def process_signal(vm_id: str, process_id: str, request: Request, caller: CallerDep):
    """Send a signal (default SIGTERM) to the process's group; 409 once it has exited."""
    parsed = parse_model(await request.body(), SignalRequest, empty_is_object=True)
    return await _processes(request).signal(caller, vm_id, process_id, parsed.signal)


@router.post("/{vm_id}/processes/{process_id}/wait", response_model=ProcessInfo, responses=ERRORS)
async def process_wait(
    vm_id: str,
    process_id: str,
    request: Request,
    caller: CallerDep,
    timeout_seconds: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 30.0,
):
    """Wait up to `timeout_seconds` for the process to exit; answers its status either way
    (`state` tells which)."""
    return await _processes(request).wait(caller, vm_id, process_id, timeout_seconds)


# --- PTY over a WebSocket ----------------------------------------------------------------


async def _ws_caller(websocket: WebSocket) -> Caller:
    """Browsers cannot set headers on a WebSocket: the key may come as `?api_key=` too."""
    header = websocket.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip() if scheme.lower() == "bearer" else ""
    key = key or websocket.query_params.get("api_key", "").strip()
    if not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or ?api_key=", field="authorization")
    user = await websocket.app.state.service.store.authenticate(key)
    if user is None:
        raise Unauthorized("invalid or revoked API key", field="authorization")
    return Caller(user_id=user.id, user_name=user.name)


async def _deny(websocket: WebSocket, exc: SandboxdError) -> None:
    """Refuse the upgrade with the usual JSON error (or close 1008 where the server
    cannot send an HTTP answer to a WebSocket request)."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    response = JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:
        await websocket.close(code=1008, reason=f"{exc.code}: {exc.message}"[:120])


def _int_param(websocket: WebSocket, name: str, default: int) -> int:
    value = websocket.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 1000:
        raise BadRequest(f"{name}: must be an integer from 1 to 1000", code="invalid_value", field=name)
    return number


PTY_DOC = """An interactive terminal over a **WebSocket** (`ws://…/v1/sandboxes/{id}/pty`).

Query: `cols`, `rows` (1–1000, default 80×24), `command` (default a login shell), `user`,
`cwd`, and `api_key` for clients that cannot send `Authorization: Bearer` (browsers).
Binary frames carry terminal input and output; text frames are JSON:
`{"type": "resize", "cols", "rows"}` or `{"type": "input", "data"}` from the client,
`{"type": "exit", "exit_code"}` from the server before it closes. Closing the WebSocket kills
every process of the terminal's session. A refused handshake answers the usual JSON error
(401, 400 naming the field, 404, 409). A plain HTTP GET answers 426."""


class WebSocketRequired(SandboxdError):
    status = 426
    code = "websocket_required"


@router.get("/{vm_id}/pty", status_code=426, responses={**ERRORS, 426: {"model": ErrorBody}}, description=PTY_DOC,
            summary="Interactive terminal (WebSocket)")  # fmt: skip
async def pty_http(vm_id: str, caller: CallerDep):
    raise WebSocketRequired("open this path as a WebSocket (see the API description)", field="upgrade")


@router.websocket("/{vm_id}/pty")
async def pty(websocket: WebSocket, vm_id: str):
    """An interactive terminal; see PTY_DOC."""
    try:
        caller = await _ws_caller(websocket)
        q = websocket.query_params
        cols, rows = _int_param(websocket, "cols", 80), _int_param(websocket, "rows", 24)
        for name in ("command", "user", "cwd"):
            if name in q and (not q[name] or "\0" in q[name] or len(q[name]) > 65536):
                raise BadRequest(f"{name}: must be a non-empty string", code="invalid_value", field=name)
        sandbox_id, session = await _processes(websocket).open_pty(
            caller, vm_id, cols=cols, rows=rows, command=q.get("command"), user=q.get("user"), cwd=q.get("cwd")
        )
    except SandboxdError as exc:
        await _deny(websocket, exc)
        return
    touch = websocket.app.state.service.activity.touch
    try:
        await websocket.accept()
    except Exception:
        await session.aclose()
        raise

    async def client_to_pty():
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            touch(sandbox_id)
            if message.get("bytes") is not None:
                await session.write(message["bytes"])
                continue
            try:
                obj = json.loads(message.get("text") or "")
                kind = obj.get("type")
                if kind == "resize":
                    cols, rows = int(obj["cols"]), int(obj["rows"])
                    if 1 <= cols <= 1000 and 1 <= rows <= 1000:
                        await session.resize(cols, rows)
                        continue
                elif kind == "input" and isinstance(obj.get("data"), str):
                    await session.write(obj["data"].encode())
                    continue
            except (ValueError, TypeError, KeyError, AttributeError):
                pass
            await websocket.send_text(json.dumps({"type": "error", "error": {
                "code": "invalid_message", "message": "expected binary input, or JSON resize/input"}}))

    async def pty_to_client():
        while True:
            frame = await session.read_frame()
            if frame is None:
                return
            kind, payload = frame
            touch(sandbox_id)
            if kind == "d":
                await websocket.send_bytes(payload)
            elif kind == "x":
                info = json.loads(payload or b"{}")
                await websocket.send_text(json.dumps({"type": "exit", "exit_code": info.get("exit_code")}))
                return

    try:
        await _until_first_done(client_to_pty(), pty_to_client())
    finally:
        await session.aclose()  # the agent kills the terminal's session when the connection goes
        await _close_quietly(websocket)


# --- exec over a WebSocket -------------------------------------------------------------------


@router.websocket("/{vm_id}/exec")
async def exec_websocket(websocket: WebSocket, vm_id: str):
    """The streaming exec over a WebSocket. The client sends one text frame, the exec body
    (as for POST, without `background`); the server answers JSON text frames
    `{"type": "stdout"|"stderr", "data", "offset"}` as the command produces output, then
    `{"type": "exit", "exit_code", "timed_out", "duration_ms"}`, and closes. An error is
    `{"type": "error", "error": {...}}` and a close with code 4000 + HTTP status. Closing
    the WebSocket early kills the command."""
    try:
        caller = await _ws_caller(websocket)
    except SandboxdError as exc:
        await _deny(websocket, exc)
        return
    await websocket.accept()
    try:
        try:
            text = await asyncio.wait_for(websocket.receive_text(), timeout=60)
        except (asyncio.TimeoutError, KeyError):
            raise BadRequest("send the exec request as the first text message", code="missing_request") from None
        body = parse_model(text.encode(), ExecRequest, empty_is_object=True)
        if body.background:
            raise BadRequest("background: not over a WebSocket; POST the exec instead",
                             code="invalid_value", field="background")  # fmt: skip
        events = await _processes(websocket).exec_stream(caller, vm_id, body)
    except WebSocketDisconnect:
        return
    except SandboxdError as exc:
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await websocket.send_text(json.dumps({"type": "error", **exc.to_body()}))
            await websocket.close(code=4000 + exc.status)
        return

    async def forward():
        try:
            async for event in events:
                if event.get("type") in ("stdout", "stderr", "exit"):
                    await websocket.send_text(json.dumps(event, ensure_ascii=False))
        except SandboxdError as exc:
            await websocket.send_text(json.dumps({"type": "error", **exc.to_body()}))
        finally:
            await events.aclose()

    async def watch():  # a client that goes away ends the exec (its close kills the command)
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    try:
        await _until_first_done(forward(), watch())
    finally:
        await _close_quietly(websocket)


async def _until_first_done(*coroutines) -> None:
    """Run the coroutines until one of them ends; cancel and reap the others."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError, OSError):
                await task


async def _close_quietly(websocket: WebSocket) -> None:
    if websocket.client_state == WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await websocket.close(code=1000)
