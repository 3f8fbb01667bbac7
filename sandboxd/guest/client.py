"""Worker-side client of the guest agent (HTTP/1.1 over a unix socket, or TCP).

Runs in the worker (not in the sandbox): it may use httpx. One pooled keep-alive
connection per concurrent call, so an exec round trip costs a few milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from typing import Any

import httpx

from sandboxd.guest.protocol import PROTOCOL_VERSION

__all__ = ["GuestClient", "GuestClientError", "GuestError", "GuestUnavailable"]

DEFAULT_TIMEOUT = 10.0  # seconds, for everything but exec
EXEC_MARGIN = 10.0  # exec HTTP timeout = timeout_seconds + this
READY_POLL_SECONDS = 0.003  # wait_ready's polling interval (a failed unix connect costs ~0.1 ms)
_LIMITS = httpx.Limits(max_connections=32, max_keepalive_connections=4, keepalive_expiry=60.0)


class GuestClientError(Exception):
    """Base class of the client's errors."""


class GuestError(GuestClientError):
    """The agent answered with an error (``status`` is the HTTP status; 0 = client-side)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class GuestUnavailable(GuestClientError):
    """The agent could not be reached (no socket yet, refused, reset, timed out)."""


class GuestClient:
    """Talks to one sandbox's guest agent.

    ``target`` is the path of the agent's unix socket, or a base URL
    (``http://10.0.0.2:7000``) for a TCP transport.
    """

    def __init__(self, target: str, token: str, *, timeout: float = DEFAULT_TIMEOUT):
        self.target = str(target)
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"}
        self._socket_fd: int | None = None
        self._http: httpx.AsyncClient | None = None
        if self.target.startswith(("http://", "https://")):
            self._http = self._make_http(httpx.AsyncHTTPTransport(limits=_LIMITS, retries=0), self.target.rstrip("/"))

    def _make_http(self, transport: httpx.AsyncHTTPTransport, base_url: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=transport, base_url=base_url, headers=self._headers, timeout=self._timeout, trust_env=False
        )

    def _socket_path(self) -> str:
        """The agent's socket, pinned to the inode the agent bound.

        The directory holding the socket is writable from inside the sandbox. Connecting by
        name would follow a symlink planted there to any socket on the host, carrying the
        sandbox's token; an O_PATH descriptor of the socket itself, reached through
        /proc/self/fd, cannot be redirected.
        """
        if self._socket_fd is None:
            try:
                fd = os.open(self.target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as e:
                raise GuestUnavailable(f"no socket at {self.target}: {e.strerror}") from None
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
                raise GuestUnavailable(f"{self.target} is not a socket (replaced from inside the sandbox?)")
            self._socket_fd = fd
        return f"/proc/self/fd/{self._socket_fd}"

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            transport = httpx.AsyncHTTPTransport(uds=self._socket_path(), limits=_LIMITS, retries=0)
            self._http = self._make_http(transport, "http://sandbox-agent")
        return self._http

    async def __aenter__(self) -> "GuestClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._socket_fd is not None:
            os.close(self._socket_fd)
            self._socket_fd = None

    async def _request(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> dict:
        try:
            resp = await self._client().request(
                method, path, timeout=self._timeout if timeout is None else timeout, **kw
            )
        except httpx.TransportError as e:  # connect/read/write errors, timeouts, protocol errors
            raise GuestUnavailable(f"guest agent at {self.target} unreachable: {type(e).__name__}: {e}") from e
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict):
                raise GuestError(resp.status_code, str(err.get("code", "error")), str(err.get("message", "")))
            raise GuestError(resp.status_code, "http_error", resp.text[:500])
        if not isinstance(data, dict):
            raise GuestError(resp.status_code, "invalid_response", "agent answered with non-JSON-object body")
        return data

    async def health(self) -> dict:
        return await self._request("GET", "/health")

    async def wait_ready(self, timeout: float) -> dict:
        """Poll /health until the agent answers; returns the health document.

        Raises GuestUnavailable on timeout, GuestError at once on an error answer (e.g. a
        wrong token) or a protocol version mismatch (code ``protocol_mismatch``).
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestUnavailable(f"guest agent not ready after {timeout:g}s: {last}")
            try:  # the agent creates its socket only once it listens: no socket, no request
                h = await self._request("GET", "/health", timeout=min(self._timeout, max(remaining, 0.05)))
            except GuestUnavailable as e:
                last = e
            else:
                if h.get("protocol") != PROTOCOL_VERSION:
                    raise GuestError(
                        0, "protocol_mismatch",
                        f"guest agent speaks protocol {h.get('protocol')!r}, worker speaks {PROTOCOL_VERSION}",
                    )
                return h
            await asyncio.sleep(min(READY_POLL_SECONDS, max(deadline - time.monotonic(), 0)))

    async def exec(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_seconds: float = 60,
        max_output_bytes: int | None = None,
        stdin: str | None = None,
        user: str | None = None,
    ) -> dict:
        """Run ``/bin/sh -c command``; returns output, stdout, stderr, exit_code, timed_out,
        truncated, duration_ms."""
        body: dict[str, Any] = {"command": command, "timeout_seconds": timeout_seconds}
        if stdin is not None:
            body["stdin"] = stdin
        if user is not None:
            body["user"] = user
        if cwd is not None:
            body["cwd"] = cwd
        if env is not None:
            body["env"] = env
        if max_output_bytes is not None:
            body["max_output_bytes"] = max_output_bytes
        try:
            http_timeout = float(timeout_seconds) + EXEC_MARGIN
        except (TypeError, ValueError):
            http_timeout = self._timeout  # the agent will reject the value with a 400
        return await self._request("POST", "/exec", json=body, timeout=http_timeout)

    async def logs(self, since: str | float | None = None, limit: int = 100) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if since is not None:
            params["since"] = since
        return await self._request("GET", "/logs", params=params)

    async def status(self) -> dict:
        return await self._request("GET", "/status")

    # --- processes and PTYs (sandboxd/guest/_procs.py) --------------------------------

    async def proc_call(
        self, method: str, path: str, *, params: dict | None = None, json: dict | None = None,
        content: bytes | None = None, timeout: float | None = None,
    ) -> dict:
        """A JSON call on the process table (/procs, /procs/get, /procs/stdin, ...)."""
        return await self._request(method, path, params=params, json=json, content=content, timeout=timeout)

    async def proc_stream(self, method: str, path: str, *, params: dict | None = None, json: dict | None = None) -> "GuestEvents":
        """Opens an NDJSON event stream (streaming exec, following output); an error answer
        raises GuestError before any event. The caller must ``aclose()`` it."""
        return GuestEvents(await self._open(method, path, params=params, json=json, timeout=PROC_STREAM_TIMEOUT))

    async def _open(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request and return its response unread (streaming); an error answer
        raises GuestError (or GuestUnavailable) before the caller sees any of the body."""
        request = self._client().build_request(method, path, **kwargs)
        try:
            resp = await self._client().send(request, stream=True)
        except httpx.TransportError as e:
            raise GuestUnavailable(f"guest agent at {self.target} unreachable: {type(e).__name__}: {e}") from e
        if resp.status_code < 400:
            return resp
        try:
            raw = await resp.aread()
        except httpx.TransportError:
            raw = b""
        finally:
            await resp.aclose()
        try:
            err = resp.json().get("error")
        except (ValueError, AttributeError):
            err = None
        if isinstance(err, dict):
            raise GuestError(resp.status_code, str(err.get("code", "error")), str(err.get("message", "")))
        raise GuestError(resp.status_code, "http_error", raw[:500].decode("utf-8", "replace"))

    async def open_pty(self, params: dict) -> "PtyConnection":
        """Opens a PTY session: a raw connection upgraded after ``101`` (see _procs framing)."""
        import json as _json
        from urllib.parse import urlencode

        try:
            if self.target.startswith(("http://", "https://")):
                url = httpx.URL(self.target)
                reader, writer = await asyncio.open_connection(url.host, url.port or 80)
            else:
                reader, writer = await asyncio.open_unix_connection(self._socket_path())
        except OSError as e:
            raise GuestUnavailable(f"guest agent at {self.target} unreachable: {e}") from e
        query = urlencode({k: v for k, v in params.items() if v is not None})
        auth = self._headers["Authorization"]
        writer.write(
            f"GET /pty?{query} HTTP/1.1\r\nHost: sandbox-agent\r\nAuthorization: {auth}\r\n"
            "Connection: Upgrade\r\nUpgrade: sandboxd-pty\r\n\r\n".encode("latin-1")
        )
        try:
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout)
            status = int(head.split(b" ", 2)[1])
            if status != 101:
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = await asyncio.wait_for(reader.readexactly(length), self._timeout) if length else b""
                writer.close()
                try:
                    err = _json.loads(body).get("error") or {}
                except (ValueError, AttributeError):
                    err = {}
                raise GuestError(status, str(err.get("code", "http_error")), str(err.get("message", body[:500])))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, IndexError) as e:
            writer.close()
            raise GuestUnavailable(f"PTY upgrade failed: {type(e).__name__}: {e}") from e
        return PtyConnection(reader, writer)

    # --- files (sandboxd/guest/_files.py) ---------------------------------------------

    async def files_call(self, method: str, path: str, *, params: dict | None = None, json: dict | None = None) -> dict:
        """A small JSON file operation (/files/stat, /files/list, /files/mkdir, ...)."""
        return await self._request(method, path, params=params, json=json, timeout=FILES_TIMEOUT)

    async def files_upload(self, path: str, params: dict, content) -> dict:
        """PUT/POST a streamed body (an async iterator of bytes, sent chunked)."""
        method = "PUT" if path == "/files" else "POST"
        return await self._request(
            method, path, params=params, content=content,
            headers={"Content-Type": "application/octet-stream"}, timeout=FILES_STREAM_TIMEOUT,
        )

    async def files_open(self, path: str, params: dict) -> "GuestStream":
        """Opens a streamed answer (download, tar, watch). The caller iterates
        ``aiter_raw()`` and must ``aclose()`` it; an error answer raises GuestError."""
        return GuestStream(await self._open("GET", path, params=params, timeout=FILES_STREAM_TIMEOUT))


PROC_STREAM_TIMEOUT = httpx.Timeout(30.0, connect=10.0)  # the agent sends a heartbeat every second


class GuestEvents:
    """An NDJSON event stream of the agent: ``async for event in events`` (dicts; heartbeats
    included, as ``{"type": "heartbeat"}``), then ``aclose()`` (closing early drops the
    connection, which the agent notices at its next write)."""

    def __init__(self, resp: httpx.Response):
        self._resp = resp

    async def __aiter__(self):
        import json as _json

        try:
            async for line in self._resp.aiter_lines():
                if line:
                    yield _json.loads(line)
        except httpx.TransportError as e:
            raise GuestUnavailable(f"guest agent stream failed: {type(e).__name__}: {e}") from e

    async def aclose(self) -> None:
        await self._resp.aclose()


class PtyConnection:
    """One PTY session with the agent. Frames: 1 byte type + 4 bytes length + payload;
    ``d`` data, ``r`` resize (``!HH`` cols, rows), ``x`` exit (JSON, last)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    async def read_frame(self) -> tuple[str, bytes] | None:
        """The next frame as (type, payload); None once the agent closed the session."""
        import struct

        try:
            head = await self._reader.readexactly(5)
            kind, length = struct.unpack("!cI", head)
            payload = await self._reader.readexactly(length)
        except (asyncio.IncompleteReadError, OSError):
            return None
        return kind.decode("latin-1"), payload

    async def _send(self, kind: bytes, payload: bytes) -> None:
        import struct

        self._writer.write(struct.pack("!cI", kind, len(payload)) + payload)
        await self._writer.drain()

    async def write(self, data: bytes) -> None:
        await self._send(b"d", data)

    async def resize(self, cols: int, rows: int) -> None:
        import struct

        await self._send(b"r", struct.pack("!HH", cols, rows))

    async def aclose(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass


class GuestStream:
    """A streamed answer of the agent: ``headers``, ``async for chunk in stream``, ``aclose()``."""

    def __init__(self, resp: httpx.Response):
        self._resp = resp
        self.headers = dict(resp.headers)

    async def __aiter__(self):
        try:
            async for chunk in self._resp.aiter_raw():
                yield chunk
        except httpx.TransportError as e:
            raise GuestUnavailable(f"guest agent stream failed: {type(e).__name__}: {e}") from e

    async def aclose(self) -> None:
        await self._resp.aclose()


FILES_TIMEOUT = 60.0
# Streams: no overall deadline; 60 s without progress on a read or write fails the transfer.
FILES_STREAM_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
