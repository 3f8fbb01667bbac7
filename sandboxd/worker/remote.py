"""RemoteWorker: the WorkerAPI of a worker on another host, over its HTTP API (worker/server.py).

The control plane holds one per registered remote worker and cannot tell it from the local
worker. Every call carries the secret the worker chose for this control plane when it
registered (README: Many hosts); the worker's errors come back as the same SandboxdError
classes, and a worker that cannot be reached is a WorkerFailure `worker_unreachable`.
Streams (exec/process events, downloads, watches) and uploads are relayed as they come,
never held whole; a PTY is a WebSocket whose binary messages are the agent's frames.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import asdict
from typing import AsyncIterator
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from sandboxd.errors import (
    BadRequest,
    Conflict,
    NoCapacity,
    NotFound,
    NotImplementedYet,
    PayloadTooLarge,
    SandboxdError,
    WorkerFailure,
)
from sandboxd.ids import hash_secret
from sandboxd.worker.interface import (
    AgentState,
    CreateSandbox,
    ExecCommand,
    PortTarget,
    SandboxStatus,
    WorkerInfo,
)

API_PREFIX = "/worker/v1"
KEY_HEADER = "x-sandboxd-worker-key"  # the control plane's secret; never Authorization, which the port proxy forwards
CALL_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
CREATE_TIMEOUT = httpx.Timeout(600.0, connect=5.0)  # may build a template or the agent CLI layer first
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # between pieces; event streams beat every second
CALL_MARGIN = 10.0  # over a command's own timeout
# What a worker's answer maps back to. 401/503 from a worker mean *we* are not registered
# with it (any more): not the API caller's fault, so they stay WorkerFailure.
_ERRORS = {400: BadRequest, 404: NotFound, 409: Conflict, 413: PayloadTooLarge, 501: NotImplementedYet}


def error_from_answer(status: int, raw: bytes) -> SandboxdError:
    try:
        error = json.loads(raw)["error"]
        code, message, field = str(error["code"]), str(error["message"]), error.get("field")
    except (ValueError, KeyError, TypeError):
        code, message, field = "worker_failure", raw[:300].decode("utf-8", "replace") or f"HTTP {status}", None
    cls = NoCapacity if code == "no_capacity" else _ERRORS.get(status, WorkerFailure)
    if status in (401, 503):
        code, message = "worker_unavailable", f"the worker refused the control plane: {message}"
    exc = cls(message, code=code, field=field)
    exc.status = 502 if status in (401, 503) or (status >= 500 and status not in (502, 504)) else status
    return exc


def _unreachable(where: str, exc: Exception) -> WorkerFailure:
    return WorkerFailure(f"worker {where} unreachable: {type(exc).__name__}: {exc}", code="worker_unreachable")


class RemoteWorker:
    def __init__(self, worker_id: str, url: str, secret: str):
        self.worker_id = worker_id
        self.url = url.rstrip("/")
        self._secret = secret
        self._http = httpx.AsyncClient(
            base_url=self.url + API_PREFIX, headers={KEY_HEADER: secret}, timeout=CALL_TIMEOUT, trust_env=False
        )

    def __repr__(self) -> str:  # never the secret
        return f"RemoteWorker({self.worker_id}, {self.url})"

    async def aclose(self) -> None:
        await self._http.aclose()

    def holds(self, secret_digest: str) -> bool:
        """Whether this handle uses the secret whose SHA-256 the worker shows in its heartbeats."""
        return hash_secret(self._secret) == secret_digest

    async def _call(self, method: str, path: str, *, timeout=None, **kwargs) -> dict:
        try:
            response = await self._http.request(method, path, timeout=timeout or CALL_TIMEOUT, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(f"at {self.url}", exc) from None
        if response.status_code >= 400:
            raise error_from_answer(response.status_code, response.content)
        return response.json()

    async def _open(self, method: str, path: str, **kwargs) -> httpx.Response:
        """A streamed answer, its errors raised before any byte is handed on."""
        request = self._http.build_request(method, path, timeout=STREAM_TIMEOUT, **kwargs)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _unreachable(f"at {self.url}", exc) from None
        if response.status_code >= 400:
            try:
                raw = await response.aread()
            except httpx.TransportError:
                raw = b""
            finally:
                await response.aclose()
            raise error_from_answer(response.status_code, raw)
        return response

    # --- WorkerAPI ----------------------------------------------------------------------

    async def info(self) -> WorkerInfo:
        return WorkerInfo(**await self._call("GET", "/info"))

    async def create_sandbox(self, request: CreateSandbox) -> SandboxStatus:
        body = asdict(request)  # includes the agent's llm_key: in this request's body only
        return SandboxStatus(**await self._call("POST", "/sandboxes", json=body, timeout=CREATE_TIMEOUT))

    async def destroy_sandbox(self, vm_id: str) -> None:
        await self._call("DELETE", f"/sandboxes/{vm_id}", timeout=CREATE_TIMEOUT)

    async def sandbox_status(self, vm_id: str) -> SandboxStatus:
        return SandboxStatus(**await self._call("GET", f"/sandboxes/{vm_id}"))

    async def list_sandboxes(self) -> list[SandboxStatus]:
        return [SandboxStatus(**item) for item in (await self._call("GET", "/sandboxes"))["sandboxes"]]

    async def exec(self, vm_id: str, command: ExecCommand) -> dict:
        timeout = None if command.timeout_seconds is None else command.timeout_seconds + CALL_MARGIN
        return await self._call(
            "POST", f"/sandboxes/{vm_id}/exec", json=asdict(command), timeout=httpx.Timeout(timeout, connect=5.0)
        )

    async def logs(self, vm_id: str, since: str | None, limit: int) -> dict:
        params = {"limit": limit, **({"since": since} if since else {})}
        return await self._call("GET", f"/sandboxes/{vm_id}/logs", params=params)

    async def port_target(self, vm_id: str, port: int) -> PortTarget:
        """The worker's own port proxy (it relays to the guest); our secret rides along."""
        url = httpx.URL(self.url)
        return PortTarget(
            host=url.host,
            port=url.port or (443 if url.scheme == "https" else 80),
            scheme=url.scheme,
            path_prefix=f"{url.path.rstrip('/')}{API_PREFIX}/sandboxes/{vm_id}/ports/{port}",
            headers={KEY_HEADER: self._secret},
        )

    async def agent_status(self, vm_id: str) -> AgentState:
        return AgentState(**await self._call("GET", f"/sandboxes/{vm_id}/agent"))

    async def cancel_agent(self, vm_id: str, grace_seconds: float) -> None:
        await self._call("POST", f"/sandboxes/{vm_id}/agent/cancel", json={"grace_seconds": grace_seconds})

    async def exec_stream(self, vm_id: str, command: ExecCommand) -> "RemoteEvents":
        return RemoteEvents(await self._open("POST", f"/sandboxes/{vm_id}/exec-stream", json=asdict(command)))

    async def process_call(self, vm_id, method, op, params=None, body=None, content=None, timeout=None) -> dict:
        envelope = {
            "method": method, "op": op, "params": params, "body": body, "timeout": timeout,
            "content": base64.b64encode(content).decode() if content is not None else None,
        }  # fmt: skip
        http_timeout = httpx.Timeout((timeout or CALL_TIMEOUT.read) + CALL_MARGIN, connect=5.0)
        return await self._call("POST", f"/sandboxes/{vm_id}/process", json=envelope, timeout=http_timeout)

    async def process_stream(self, vm_id: str, op: str, params: dict) -> "RemoteEvents":
        return RemoteEvents(
            await self._open("POST", f"/sandboxes/{vm_id}/process-stream", json={"op": op, "params": params})
        )

    async def open_pty(self, vm_id: str, params: dict) -> "RemotePty":
        query = urlencode({k: v for k, v in params.items() if v is not None})
        ws_url = self.url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        try:
            ws = await ws_connect(
                f"{ws_url}{API_PREFIX}/sandboxes/{vm_id}/pty?{query}", additional_headers={KEY_HEADER: self._secret},
                max_size=None, compression=None, proxy=None, open_timeout=10,
            )  # fmt: skip
        except InvalidStatus as exc:
            raise error_from_answer(exc.response.status_code, exc.response.body or b"") from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise _unreachable(f"at {self.url}", exc) from None
        return RemotePty(ws)

    async def files_call(self, vm_id: str, method: str, op: str, params: dict | None, body: dict | None) -> dict:
        envelope = {"method": method, "op": op, "params": params, "body": body}
        return await self._call("POST", f"/sandboxes/{vm_id}/files", json=envelope, timeout=STREAM_TIMEOUT)

    async def files_upload(self, vm_id: str, op: str, params: dict, content: AsyncIterator[bytes]) -> dict:
        query = {"op": op, "params": json.dumps(params)}
        try:
            response = await self._http.post(
                f"/sandboxes/{vm_id}/files-upload", params=query, content=content, timeout=STREAM_TIMEOUT,
                headers={"content-type": "application/octet-stream"},
            )  # fmt: skip
        except httpx.TransportError as exc:
            raise _unreachable(f"at {self.url}", exc) from None
        if response.status_code >= 400:
            raise error_from_answer(response.status_code, response.content)
        return response.json()

    async def files_open(self, vm_id: str, op: str, params: dict) -> "RemoteBytes":
        query = {"op": op, "params": json.dumps(params)}
        return RemoteBytes(await self._open("GET", f"/sandboxes/{vm_id}/files-open", params=query))


class RemoteEvents:
    """A worker's SSE event stream (one `data: {json}` per event) as an EventStream."""

    def __init__(self, response: httpx.Response):
        self._response = response

    async def __aiter__(self):
        try:
            async for line in self._response.aiter_lines():
                if line.startswith("data: "):
                    yield json.loads(line[6:])
        except httpx.TransportError as exc:
            raise _unreachable("stream", exc) from None

    async def aclose(self) -> None:
        await self._response.aclose()  # the worker sees the disconnect and closes the guest's stream


class RemoteBytes:
    """A worker's streamed answer (download, tar, watch) as a ByteStream."""

    def __init__(self, response: httpx.Response):
        self._response = response
        self.headers = dict(response.headers)

    async def __aiter__(self):
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:
            raise _unreachable("stream", exc) from None

    async def aclose(self) -> None:
        await self._response.aclose()


class RemotePty:
    """A PTY on a remote worker: binary WebSocket messages of one frame-type byte + payload
    (the guest agent's `d` data, `r` resize, `x` exit)."""

    def __init__(self, ws):
        self._ws = ws

    async def read_frame(self) -> tuple[str, bytes] | None:
        try:
            message = await self._ws.recv()
        except ConnectionClosed:
            return None
        if isinstance(message, str) or not message:
            return None
        return chr(message[0]), bytes(message[1:])

    async def write(self, data: bytes) -> None:
        await self._ws.send(b"d" + data)

    async def resize(self, cols: int, rows: int) -> None:
        await self._ws.send(b"r" + struct.pack("!HH", cols, rows))

    async def aclose(self) -> None:
        await self._ws.close()
