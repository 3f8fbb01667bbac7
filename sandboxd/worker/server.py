"""`sandboxd worker`: a LocalWorker on its own host, serving the WorkerAPI over HTTP.

    GET  /worker/v1/info                                 WorkerInfo
    GET|POST /worker/v1/sandboxes, GET|DELETE .../{id}   list, create, status, destroy
    POST .../{id}/exec, GET .../{id}/logs                blocking exec, logs
    GET .../{id}/agent, POST .../{id}/agent/cancel       agent run
    POST .../{id}/exec-stream, .../{id}/process-stream   SSE: one `data: {event}` per event
    POST .../{id}/process, .../{id}/files                one call on the agent's /procs or /files
    POST .../{id}/files-upload, GET .../{id}/files-open  streamed bodies, never held whole
    WS   .../{id}/pty                                    binary messages: frame type byte + payload
    ANY|WS .../{id}/ports/{port}/{path}                  relay to the sandbox's port (PortTarget)

Mutual authentication (README: Many hosts): the worker registers with each control plane
it is given (`--control-plane`, repeatable) by showing its worker token, and hands over a
fresh random secret in that same request; the control plane keeps it in memory only and
sends it with every call (`X-Sandboxd-Worker-Key`). The worker answers nobody else: no
secret, no answer. A control plane that restarted has forgotten the secret, so it answers
the next heartbeat 409 and the worker registers again with a new one. Sandboxes cannot
reach this API: the worker's nftables table drops whatever a sandbox sends to its host.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import secrets
import struct
from dataclasses import asdict

import anyio
import httpx
from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import TypeAdapter
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from sandboxd import __version__
from sandboxd.api.errors import install_error_handlers
from sandboxd.api.processes import _close_quietly, _deny, _until_first_done
from sandboxd.api.proxy import HOP_BY_HOP, METHODS, WS_HANDSHAKE, WS_MAX_SIZE, _close_code, _unreachable
from sandboxd.config import Settings
from sandboxd.errors import BadRequest, SandboxdError
from sandboxd.guest.client import GuestClientError
from sandboxd.ids import hash_secret
from sandboxd.worker.interface import CreateSandbox, ExecCommand
from sandboxd.worker.manager import LocalWorker
from sandboxd.worker.remote import API_PREFIX, KEY_HEADER

log = logging.getLogger(__name__)

router = APIRouter(prefix=API_PREFIX)
HEARTBEAT_TIMEOUT = 5.0  # a heartbeat stuck on a cut link must not hold up the next one for long
_CREATE = TypeAdapter(CreateSandbox)
_EXEC = TypeAdapter(ExecCommand)


class ControlPlaneLink:
    """Registers this worker with each control plane, heartbeats, and holds the secrets
    the control planes call it with (one each, in memory only)."""

    def __init__(self, worker: LocalWorker, control_planes: list[str], token: str, url: str, interval: float):
        self.worker = worker
        self.control_planes = [cp.rstrip("/") for cp in control_planes]
        self.url = url
        self.interval = interval
        self._auth = {"Authorization": f"Bearer {token}"}
        self._secrets: dict[str, str] = {}  # control plane -> its secret
        self._offered: dict[str, str] = {}  # secrets in registration requests still in flight

    @property
    def registered_with(self) -> int:
        return len(self._secrets)

    def accepts(self, key: str) -> bool:
        candidates = [*self._secrets.values(), *self._offered.values()]
        return any(hmac.compare_digest(key.encode(), secret.encode()) for secret in candidates)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0), trust_env=False) as http:
            while True:
                await asyncio.gather(*(self._beat(http, cp) for cp in self.control_planes))
                await asyncio.sleep(self.interval)

    async def _beat(self, http: httpx.AsyncClient, cp: str) -> None:
        try:
            secret = self._secrets.get(cp)
            if secret is not None:
                beat = {"worker_id": self.worker.worker_id, "secret_sha256": hash_secret(secret)}
                answer = await http.post(f"{cp}/v1/workers/heartbeat", headers=self._auth, json=beat,
                                         timeout=HEARTBEAT_TIMEOUT)  # fmt: skip
                if answer.status_code == 200:
                    return
                if answer.status_code != 409:  # 409: that control plane no longer knows us
                    log.warning("heartbeat refused by %s: %s", cp, _error_text(answer))
                    return
            await self._register(http, cp)
        except httpx.TransportError as exc:
            log.warning("control plane %s unreachable: %s", cp, type(exc).__name__)

    async def _register(self, http: httpx.AsyncClient, cp: str) -> None:
        offered = self._offered[cp] = secrets.token_urlsafe(32)  # it calls us back before it answers
        try:
            answer = await http.post(f"{cp}/v1/workers/register", headers=self._auth, timeout=300.0, json={
                "worker_id": self.worker.worker_id, "url": self.url, "secret": offered})  # fmt: skip
        finally:
            self._offered.pop(cp, None)
        if answer.status_code != 200:
            log.warning("registration refused by %s: %s", cp, _error_text(answer))
            return
        self._secrets[cp] = offered
        self.interval = min(self.interval, float(answer.json().get("heartbeat_interval_seconds", self.interval)))
        log.info("registered with %s", cp)


def _error_text(answer: httpx.Response) -> str:
    try:
        error = answer.json()["error"]
        return f"{answer.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {answer.status_code}"


class _ControlPlaneOnly:
    """ASGI middleware: every request but /healthz must carry a control plane's secret."""

    def __init__(self, app, accepts):
        self.app = app
        self.accepts = accepts

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and scope["path"] != "/healthz":
            key = dict(scope["headers"]).get(KEY_HEADER.encode(), b"").decode("latin-1")
            if not key or not self.accepts(key):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = {"error": {"code": "unauthorized", "message": "not a control plane of this worker"}}
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_worker_app(settings: Settings, control_planes: list[str], token: str, url: str) -> FastAPI:
    worker = LocalWorker(settings)
    link = ControlPlaneLink(worker, control_planes, token, url, settings.heartbeat_interval_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await worker.start()
        app.state.worker = worker
        app.state.proxy_client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(connect=5.0, read=None, write=None, pool=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),  # a guest IP is reused
        )  # fmt: skip
        registration = asyncio.create_task(link.run())
        try:
            yield
        finally:
            registration.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await registration
            await app.state.proxy_client.aclose()
            await worker.stop()

    app = FastAPI(title="sandboxd worker", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None)
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(_ControlPlaneOnly, accepts=link.accepts)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "worker_id": worker.worker_id, "registered_with": link.registered_with}

    return app


def _worker(request: Request | WebSocket) -> LocalWorker:
    return request.app.state.worker


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise BadRequest("body: not valid JSON", code="invalid_json", field="body") from None
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object", code="invalid_type", field="body")
    return body


def _query_json(request: Request, name: str) -> dict:
    try:
        value = json.loads(request.query_params.get(name) or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise BadRequest(f"{name}: must be a JSON object", code="invalid_value", field=name)
    return value


def _events(events) -> StreamingResponse:
    """A guest event stream as SSE; closing it (shielded) is what stops a foreground command."""

    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except GuestClientError as exc:  # the sandbox went away mid-stream: end it
            log.info("event stream ended: %s", exc)
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


# --- the WorkerAPI ----------------------------------------------------------------------------


@router.get("/info")
async def info(request: Request):
    return asdict(await _worker(request).info())


@router.post("/sandboxes")
async def create_sandbox(request: Request):
    return asdict(await _worker(request).create_sandbox(_CREATE.validate_python(await _json(request))))


@router.get("/sandboxes")
async def list_sandboxes(request: Request):
    return {"sandboxes": [asdict(status) for status in await _worker(request).list_sandboxes()]}


@router.get("/sandboxes/{vm_id}")
async def sandbox_status(vm_id: str, request: Request):
    return asdict(await _worker(request).sandbox_status(vm_id))


@router.delete("/sandboxes/{vm_id}")
async def destroy_sandbox(vm_id: str, request: Request):
    await _worker(request).destroy_sandbox(vm_id)
    return {}


@router.post("/sandboxes/{vm_id}/exec")
async def exec_command(vm_id: str, request: Request):
    return await _worker(request).exec(vm_id, _EXEC.validate_python(await _json(request)))


@router.get("/sandboxes/{vm_id}/logs")
async def logs(vm_id: str, request: Request, limit: int = 100, since: str | None = None):
    return await _worker(request).logs(vm_id, since, limit)


@router.get("/sandboxes/{vm_id}/agent")
async def agent_status(vm_id: str, request: Request):
    return asdict(await _worker(request).agent_status(vm_id))


@router.post("/sandboxes/{vm_id}/agent/cancel")
async def cancel_agent(vm_id: str, request: Request):
    grace = (await _json(request)).get("grace_seconds")
    if not isinstance(grace, (int, float)) or grace < 0:
        raise BadRequest("grace_seconds: must be a non-negative number", code="invalid_value", field="grace_seconds")
    await _worker(request).cancel_agent(vm_id, float(grace))
    return {}


@router.post("/sandboxes/{vm_id}/exec-stream")
async def exec_stream(vm_id: str, request: Request):
    return _events(await _worker(request).exec_stream(vm_id, _EXEC.validate_python(await _json(request))))


@router.post("/sandboxes/{vm_id}/process")
async def process_call(vm_id: str, request: Request):
    call = await _json(request)
    try:
        content = base64.b64decode(call["content"], validate=True) if call.get("content") is not None else None
        method, op = str(call["method"]), str(call["op"])
    except (KeyError, ValueError, TypeError):
        raise BadRequest("body: method, op and base64 content expected", code="invalid_value", field="body") from None
    return await _worker(request).process_call(
        vm_id, method, op, params=call.get("params"), body=call.get("body"), content=content,
        timeout=call.get("timeout"),
    )  # fmt: skip


@router.post("/sandboxes/{vm_id}/process-stream")
async def process_stream(vm_id: str, request: Request):
    call = await _json(request)
    return _events(await _worker(request).process_stream(vm_id, str(call.get("op")), call.get("params") or {}))


@router.post("/sandboxes/{vm_id}/files")
async def files_call(vm_id: str, request: Request):
    call = await _json(request)
    return await _worker(request).files_call(
        vm_id, str(call.get("method")), str(call.get("op")), call.get("params"), call.get("body")
    )


@router.post("/sandboxes/{vm_id}/files-upload")
async def files_upload(vm_id: str, request: Request, op: str):
    return await _worker(request).files_upload(vm_id, op, _query_json(request, "params"), request.stream())


@router.get("/sandboxes/{vm_id}/files-open")
async def files_open(vm_id: str, request: Request, op: str):
    stream = await _worker(request).files_open(vm_id, op, _query_json(request, "params"))

    async def body():
        try:
            async for chunk in stream:
                yield chunk
        except GuestClientError as exc:
            log.info("file stream of %s ended: %s", vm_id, exc)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    headers = {k: v for k, v in stream.headers.items() if k.lower() not in HOP_BY_HOP | {"date", "server"}}
    return StreamingResponse(body(), headers=headers)


@router.websocket("/sandboxes/{vm_id}/pty")
async def pty(websocket: WebSocket, vm_id: str):
    try:
        session = await _worker(websocket).open_pty(vm_id, dict(websocket.query_params))
    except SandboxdError as exc:
        await _deny(websocket, exc)
        return
    await websocket.accept()

    async def control_plane_to_pty():
        while True:
            message = await websocket.receive()
            data = message.get("bytes")
            if message["type"] == "websocket.disconnect":
                return
            if data and data[:1] == b"d":
                await session.write(data[1:])
            elif data and data[:1] == b"r" and len(data) == 5:
                await session.resize(*struct.unpack("!HH", data[1:]))

    async def pty_to_control_plane():
        while (frame := await session.read_frame()) is not None:
            kind, payload = frame
            await websocket.send_bytes(kind.encode("latin-1") + payload)

    try:
        await _until_first_done(control_plane_to_pty(), pty_to_control_plane())
    finally:
        await session.aclose()
        await _close_quietly(websocket)


# --- the port relay (what RemoteWorker.port_target points the control plane's proxy at) -------


def _upstream_path(scope, vm_id: str, port: int) -> str:
    """The request's own path after /ports/{port}, as sent (not re-encoded), with its query."""
    raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    rest = raw.split(f"/sandboxes/{vm_id}/ports/{port}", 1)[-1] or "/"
    query = scope.get("query_string", b"").decode("latin-1")
    return f"{rest}?{query}" if query else rest


@router.api_route("/sandboxes/{vm_id}/ports/{port}/{path:path}", methods=METHODS)
async def port_http(vm_id: str, port: int, path: str, request: Request):
    target = await _worker(request).port_target(vm_id, port)
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {KEY_HEADER}]
    has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
    if "content-length" in request.headers and has_body:
        headers.append(("content-length", request.headers["content-length"]))
    client: httpx.AsyncClient = request.app.state.proxy_client
    upstream_request = client.build_request(
        request.method, f"{target.scheme}://{target.host}:{target.port}{_upstream_path(request.scope, vm_id, port)}",
        headers=headers, content=request.stream() if has_body else None,
    )  # fmt: skip
    try:
        upstream = await client.send(upstream_request, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
        raise _unreachable(vm_id, port, exc) from None

    async def body():
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            log.info("relay %s:%d cut short: %s", vm_id, port, type(exc).__name__)
        finally:
            await upstream.aclose()

    response = StreamingResponse(body(), status_code=upstream.status_code)
    response.raw_headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in upstream.headers.multi_items()
        if name.lower() not in HOP_BY_HOP - {"content-length"}
    ]
    return response


@router.websocket("/sandboxes/{vm_id}/ports/{port}/{path:path}")
async def port_websocket(websocket: WebSocket, vm_id: str, port: int, path: str):
    try:
        target = await _worker(websocket).port_target(vm_id, port)
    except SandboxdError as exc:
        await _deny(websocket, exc)
        return
    skip = HOP_BY_HOP | WS_HANDSHAKE | {KEY_HEADER, "origin", "user-agent"}
    headers = [(k, v) for k, v in websocket.headers.items() if k.lower() not in skip]
    subprotocols = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    scheme = "wss" if target.scheme == "https" else "ws"
    try:
        upstream = await ws_connect(
            f"{scheme}://{target.host}:{target.port}{_upstream_path(websocket.scope, vm_id, port)}",
            additional_headers=headers, subprotocols=subprotocols or None, origin=websocket.headers.get("origin"),
            user_agent_header=websocket.headers.get("user-agent"), compression=None, proxy=None, open_timeout=10,
            max_size=WS_MAX_SIZE,
        )  # fmt: skip
    except InvalidStatus as exc:  # the sandbox's server refused the upgrade: pass its answer on
        answer = exc.response
        await websocket.send_denial_response(Response(answer.body or b"", status_code=answer.status_code,
                                                      media_type=answer.headers.get("content-type")))  # fmt: skip
        return
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        await _deny(websocket, _unreachable(vm_id, port, exc))
        return
    await websocket.accept(subprotocol=upstream.subprotocol)

    async def to_upstream():
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(code=_close_code(message.get("code")), reason=message.get("reason") or "")
                return
            await upstream.send(message["text"] if message.get("text") is not None else message["bytes"])

    async def from_upstream():
        with contextlib.suppress(ConnectionClosed):
            async for data in upstream:
                await (websocket.send_text(data) if isinstance(data, str) else websocket.send_bytes(data))
        code = upstream.close_code if upstream.close_code is not None else 1000
        await websocket.close(code=_close_code(code), reason=upstream.close_reason or None)

    try:
        await _until_first_done(to_upstream(), from_upstream())
    finally:
        with contextlib.suppress(Exception):
            await upstream.close()
        await _close_quietly(websocket)
