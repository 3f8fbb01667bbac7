"""Ports and preview links: an authenticated HTTP + WebSocket reverse proxy per sandbox and port.

    ANY  /v1/sandboxes/{id}/ports/{port}/{path}   HTTP, streamed both ways, redirects passed through
    WS   /v1/sandboxes/{id}/ports/{port}/{path}   WebSocket, text/binary frames and close codes relayed
    POST /v1/sandboxes/{id}/access-token          a preview token for this sandbox (API key only)
    DELETE /v1/sandboxes/{id}/access-token        revoke every token of this sandbox

Credentials: the API key (stripped before forwarding) or a sandbox access token (see
controlplane/ports.py). A token given as ?sandbox_token= is removed from the forwarded query
and set as an HttpOnly cookie scoped to /v1/sandboxes/{id}/ports/ so a page's sub-resources
load; the cookie is removed from the forwarded Cookie header. Nothing here logs URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timezone
from typing import Annotated

import httpx
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from sandboxd.api.auth import require_caller
from sandboxd.api.bodies import read_model
from sandboxd.api.errors import error_response
from sandboxd.api.schemas import ErrorBody
from sandboxd.controlplane.ports import (
    MAX_TOKEN_TTL_SECONDS,
    TOKEN_COOKIE,
    TOKEN_HEADER,
    TOKEN_QUERY,
    Access,
    PortAccess,
    parse_port,
    proxy_prefix,
)
from sandboxd.errors import SandboxdError, WorkerFailure
from sandboxd.worker.interface import PortTarget

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sandboxes", tags=["ports"])
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 502)}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip  (content-length: re-set from the body actually sent)
WS_HANDSHAKE = {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
WS_MAX_SIZE = 16 * 1024 * 1024


class AccessTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expires_in_seconds: Annotated[int, Field(ge=1, le=MAX_TOKEN_TTL_SECONDS)] | None = Field(
        None, description="Default 3600; never past the sandbox's own expiry."
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(9090, description="The port preview_url opens.")


class AccessTokenResponse(BaseModel):
    token: str = Field(description="Shown once; stored only as a SHA-256 hash.")
    expires_at: str
    preview_url: str = Field(description="Opens the port without the API key (the token rides in the query).")


class RevokeTokensResponse(BaseModel):
    vm_id: str
    revoked: int = Field(description="How many live tokens were revoked.")


def _access(request_or_ws) -> PortAccess:
    state = request_or_ws.app.state
    access = getattr(state, "port_access", None)
    if access is None or access.service is not state.service:
        access = state.port_access = PortAccess(state.service)
    return access


def _client(request_or_ws) -> httpx.AsyncClient:
    state = request_or_ws.app.state
    client = getattr(state, "proxy_client", None)
    if client is None:
        # No keep-alive: a guest IP is reused by the next sandbox on the same network slot.
        client = state.proxy_client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(connect=5.0, read=None, write=None, pool=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
        )
    return client


def _iso(value) -> str:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


# --- access tokens ---------------------------------------------------------------------------


@router.post(
    "/{vm_id}/access-token",
    response_model=AccessTokenResponse,
    status_code=201,
    responses={**ERRORS, 413: {"model": ErrorBody}},
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": AccessTokenRequest.model_json_schema()}},
        }
    },
)
async def create_access_token(vm_id: str, request: Request):
    """A token that opens this sandbox's ports (and nothing else) without the API key."""
    caller = await require_caller(request)
    params = await read_model(request, AccessTokenRequest, empty_is_object=True)
    issued = await _access(request).issue_token(caller, vm_id, params.expires_in_seconds)
    base = str(request.base_url).rstrip("/")
    preview = f"{base}{proxy_prefix(vm_id)}{params.port}/?{TOKEN_QUERY}={issued.token}"
    return JSONResponse(
        {"token": issued.token, "expires_at": _iso(issued.expires_at), "preview_url": preview},
        status_code=201,
        headers={"Cache-Control": "no-store"},
    )


@router.delete("/{vm_id}/access-token", response_model=RevokeTokensResponse, responses=ERRORS)
async def revoke_access_tokens(vm_id: str, request: Request):
    """Revoke every access token of this sandbox (they also die with the sandbox)."""
    caller = await require_caller(request)
    revoked = await _access(request).revoke_tokens(caller, vm_id)
    return {"vm_id": vm_id, "revoked": revoked}


# --- shared request handling -----------------------------------------------------------------


def _bearer(headers) -> str | None:
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _query_without_token(raw_query: bytes) -> tuple[str, str | None]:
    """The query string minus sandbox_token (kept raw otherwise), and that token."""
    kept, token = [], None
    for part in raw_query.decode("latin-1").split("&"):
        if part.startswith(TOKEN_QUERY + "="):
            token = httpx.QueryParams(part).get(TOKEN_QUERY)
        elif part:
            kept.append(part)
    return "&".join(kept), token


def _cookie_without_token(header: str) -> tuple[str, str | None]:
    kept, token = [], None
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == TOKEN_COOKIE:
            token = token or value
        elif part.strip():
            kept.append(part.strip())
    return "; ".join(kept), token


class _Incoming:
    """What both the HTTP and the WebSocket route need from the client's request."""

    def __init__(self, scope, headers, vm_id: str, port: str):
        self.vm_id = vm_id
        self.port_text = port
        self.query, self.query_token = _query_without_token(scope.get("query_string", b""))
        self.cookie, self.cookie_token = _cookie_without_token(headers.get("cookie", ""))
        self.header_token = headers.get(TOKEN_HEADER)
        self.api_key = _bearer(headers)
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        prefix = f"{proxy_prefix(vm_id)}{port}"
        self.path = raw_path[len(prefix) :] if raw_path.startswith(prefix) else "/"
        self.path = self.path if self.path.startswith("/") else "/" + self.path

    async def authorize(self, access: PortAccess) -> tuple[Access, int]:
        tokens = [t for t in (self.query_token, self.header_token, self.cookie_token) if t]
        result = await access.authorize(self.vm_id, api_key=self.api_key, tokens=tokens)
        return result, parse_port(self.port_text)

    def upstream_url(self, target: PortTarget, *, websocket: bool = False) -> str:
        scheme = {"http": "ws", "https": "wss"}[target.scheme] if websocket else target.scheme
        url = f"{scheme}://{target.host}:{target.port}{target.path_prefix}{self.path}"
        return f"{url}?{self.query}" if self.query else url

    def forward_headers(self, headers, access: Access, client_host: str | None, scheme: str, skip=()) -> list:
        out = []
        connection_named = {h.strip().lower() for h in headers.get("connection", "").split(",")}
        for name, value in headers.items():
            lname = name.lower()
            if lname in HOP_BY_HOP or lname in connection_named or lname in skip:
                continue
            if lname in (TOKEN_HEADER, "cookie", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                         "x-forwarded-prefix"):  # fmt: skip
                continue
            if lname == "authorization" and not access.via_token:
                continue  # our API key never reaches the sandbox
            out.append((name, value))
        if self.cookie:
            out.append(("cookie", self.cookie))
        forwarded_for = ", ".join(filter(None, [headers.get("x-forwarded-for"), client_host]))
        if forwarded_for:
            out.append(("x-forwarded-for", forwarded_for))
        if headers.get("host"):
            out.append(("x-forwarded-host", headers["host"]))
        out.append(("x-forwarded-proto", scheme))
        out.append(("x-forwarded-prefix", f"{proxy_prefix(self.vm_id)}{self.port_text}"))
        return out

    def token_cookie(self, access: Access, *, secure: bool) -> str | None:
        """Set-Cookie for a token that came in the query (so sub-resources load)."""
        if not (access.via_token and self.query_token):
            return None
        from sandboxd.store.repo import utcnow

        max_age = max(0, int((access.token_expires_at - utcnow()).total_seconds()))
        cookie = (
            f"{TOKEN_COOKIE}={self.query_token}; Path={proxy_prefix(self.vm_id)}; Max-Age={max_age}; "
            "HttpOnly; SameSite=Lax"
        )
        return cookie + ("; Secure" if secure else "")


def _unreachable(vm_id: str, port: int, exc: Exception) -> WorkerFailure:
    return WorkerFailure(
        f"nothing answers on port {port} of sandbox {vm_id} ({type(exc).__name__}: {exc})",
        code="port_unreachable",
        field="port",
    )


# --- HTTP --------------------------------------------------------------------------------------


async def _proxy_http(request: Request, vm_id: str, port: str) -> Response:
    incoming = _Incoming(request.scope, request.headers, vm_id, port)
    access_api = _access(request)
    access, port_number = await incoming.authorize(access_api)
    target = await access_api.target(access.sandbox, port_number)
    headers = incoming.forward_headers(
        request.headers, access, request.client.host if request.client else None, request.url.scheme
    )
    headers += list(target.headers.items())
    has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
    if "content-length" in request.headers and has_body:
        headers.append(("content-length", request.headers["content-length"]))
    upstream_request = _client(request).build_request(
        request.method,
        incoming.upstream_url(target),
        headers=headers,
        content=request.stream() if has_body else None,
    )
    try:
        upstream = await _client(request).send(upstream_request, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
        raise _unreachable(vm_id, port_number, exc) from None
    sandbox_id = access.sandbox.id

    async def body():
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:  # the sandbox's server went away mid-response
            log.info("proxy %s:%d response cut short: %s", sandbox_id, port_number, type(exc).__name__)
        finally:
            access_api.touch(sandbox_id)
            await upstream.aclose()  # also when the client went away mid-response

    response = StreamingResponse(body(), status_code=upstream.status_code, background=BackgroundTask(upstream.aclose))
    connection_named = {h.strip().lower() for h in upstream.headers.get("connection", "").split(",")}
    raw = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in upstream.headers.multi_items()
        if name.lower() not in HOP_BY_HOP - {"content-length"} and name.lower() not in connection_named
    ]
    cookie = incoming.token_cookie(access, secure=request.url.scheme == "https")
    if cookie:
        raw.append((b"set-cookie", cookie.encode("latin-1")))
        raw.append((b"cache-control", b"no-store"))  # the URL carries a token: keep it out of caches
    response.raw_headers = raw
    return response


_PROXY_DOC = dict(
    responses={**ERRORS, 200: {"description": "Whatever the sandbox's server answers, streamed."}},
    summary="Proxy HTTP to a port of the sandbox",
    description=(
        "Any method. Auth: `Authorization: Bearer <API key>` (stripped before forwarding) or a sandbox "
        "access token as `?sandbox_token=` (then set as a cookie scoped to the sandbox's proxy path), "
        "`X-Sandbox-Token` header or `sandboxd_token` cookie. Request and response bodies are streamed; "
        "redirects are passed through, not followed. 400 `invalid_port`, 401, 404 (not yours), "
        "409 `sandbox_not_running`, 502 `port_unreachable` when nothing listens. "
        "WebSocket upgrades on the same path are relayed (text, binary, close codes)."
    ),
)


async def proxy_http(vm_id: str, port: str, path: str, request: Request):
    return await _proxy_http(request, vm_id, port)


for _method in METHODS:  # one route per method: distinct OpenAPI operation ids
    router.add_api_route(
        "/{vm_id}/ports/{port}/{path:path}", proxy_http, methods=[_method],
        operation_id=f"proxy_{_method.lower()}", **_PROXY_DOC,
    )  # fmt: skip


@router.api_route("/{vm_id}/ports/{port}", methods=METHODS, include_in_schema=False)
async def proxy_http_root(vm_id: str, port: str, request: Request):
    return await _proxy_http(request, vm_id, port)


# --- WebSocket ---------------------------------------------------------------------------------

_RESERVED_CLOSE = {1005: 1000, 1006: 1011, 1015: 1011}


def _close_code(code: int | None) -> int:
    if code is None:
        return 1000
    return _RESERVED_CLOSE.get(code, code)


async def _deny(websocket: WebSocket, error: SandboxdError) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    await websocket.send_denial_response(error_response(error, headers))


@router.websocket("/{vm_id}/ports/{port}/{path:path}")
async def proxy_websocket(websocket: WebSocket, vm_id: str, port: str, path: str):
    await _proxy_websocket(websocket, vm_id, port)


@router.websocket("/{vm_id}/ports/{port}")
async def proxy_websocket_root(websocket: WebSocket, vm_id: str, port: str):
    await _proxy_websocket(websocket, vm_id, port)


async def _proxy_websocket(websocket: WebSocket, vm_id: str, port: str) -> None:
    incoming = _Incoming(websocket.scope, websocket.headers, vm_id, port)
    access_api = _access(websocket)
    try:
        access, port_number = await incoming.authorize(access_api)
        target = await access_api.target(access.sandbox, port_number)
    except SandboxdError as exc:
        await _deny(websocket, exc)
        return
    scheme = "https" if websocket.url.scheme == "wss" else "http"
    headers = incoming.forward_headers(
        websocket.headers, access, websocket.client.host if websocket.client else None, scheme,
        skip=WS_HANDSHAKE | {"origin", "user-agent"},
    )  # fmt: skip
    headers += list(target.headers.items())
    subprotocols = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    try:
        upstream = await ws_connect(
            incoming.upstream_url(target, websocket=True),
            additional_headers=headers,
            subprotocols=subprotocols or None,
            origin=websocket.headers.get("origin"),
            user_agent_header=websocket.headers.get("user-agent"),
            compression=None,
            proxy=None,
            open_timeout=10,
            max_size=WS_MAX_SIZE,
        )
    except InvalidStatus as exc:  # the sandbox's server answered, but refused the upgrade
        upstream_response = exc.response
        await websocket.send_denial_response(
            Response(upstream_response.body or b"", status_code=upstream_response.status_code,
                     media_type=upstream_response.headers.get("content-type"))
        )  # fmt: skip
        return
    except (OSError, InvalidHandshake, TimeoutError, asyncio.TimeoutError) as exc:
        await _deny(websocket, _unreachable(vm_id, port_number, exc))
        return
    sandbox_id = access.sandbox.id
    extra = []
    cookie = incoming.token_cookie(access, secure=scheme == "https")
    if cookie:
        extra.append((b"set-cookie", cookie.encode("latin-1")))
    await websocket.accept(subprotocol=upstream.subprotocol, headers=extra)

    async def client_to_upstream():
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = _close_code(message.get("code"))
                await upstream.close(code=code, reason=message.get("reason") or "")
                return
            access_api.touch(sandbox_id)
            if message.get("text") is not None:
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send(message["bytes"])

    async def upstream_to_client():
        try:
            async for data in upstream:
                access_api.touch(sandbox_id)
                if isinstance(data, str):
                    await websocket.send_text(data)
                else:
                    await websocket.send_bytes(data)
        except ConnectionClosed:
            pass
        code = upstream.close_code if upstream.close_code is not None else 1000
        await websocket.close(code=_close_code(code), reason=upstream.close_reason or None)

    tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await upstream.close()
        access_api.touch(sandbox_id)
